"""`musclelora analyze` in train mode: a method preset fine-tunes with the frequency callback and figures follow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from peft_musclelora.benchmark.cli import main


@pytest.mark.parametrize("method", ["lora", "musclelora"])
def test_analyze_trains_a_preset_and_records_the_four_errors(
    method: str, tiny_bert: Path, attack_dir: Path, tmp_path: Path
) -> None:
    output_dir = tmp_path / method
    argv = ["analyze", "--method", method, "--attack", "badnets", "--data", str(attack_dir)]
    argv += ["--model", str(tiny_bert), "--epochs", "1", "--batch-size", "8", "--every-n-steps", "2"]
    argv += ["--samples", "8", "--output-dir", str(output_dir), "--set", "reference_split_size=8"]

    assert main(argv) == 0

    log = json.loads((output_dir / "frequency_log.json").read_text())
    records = log["records"]
    assert records[0]["step"] == 0 and len(records) >= 2
    for key in ("backdoor_low", "clean_low", "backdoor_high", "clean_high"):
        assert all(len(record[key]) == len(log["deltas"]) for record in records), key
    assert sorted(p.name for p in output_dir.glob("*.png")) == [f"{method}-curves.png", f"{method}-heatmap.png"]


def test_analyze_defaults_to_seed_0_like_every_command_and_takes_the_target_label() -> None:
    from peft_musclelora.benchmark.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["analyze", "--method", "lora"])
    assert args.seed == 0 and args.target_label == 1
    assert parser.parse_args(["analyze", "--method", "lora", "--target-label", "0"]).target_label == 0
    assert (
        parser.parse_args(["bench"]).seeds == [0]
        and parser.parse_args(["train", "--method", "lora", "--train", "x", "--dev", "y"]).seed == 0
    )
