"""Specification of the frequency analysis: the filter, the errors, the analyzer, the callback, plots and the CLI."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from transformers import BertForSequenceClassification, Trainer, TrainingArguments

import peft_musclelora.frequency as frequency
from peft_musclelora.frequency import (
    DEFAULT_DELTAS,
    ERROR_NAMES,
    FrequencyAnalysisCallback,
    FrequencyAnalyzer,
    gaussian_filter_kernels,
    load_frequency_log,
    pairwise_distances,
    relative_errors,
    split_frequencies,
)
from tests.ga_helpers import SEQ_LEN, VOCAB, tiny_bert

# ---------------------------------------------------------------------------------------------------------------------
# The filter on hand-made data
# ---------------------------------------------------------------------------------------------------------------------


def test_default_deltas_are_linspace_2_to_8_in_25_steps():
    assert len(DEFAULT_DELTAS) == 25
    assert DEFAULT_DELTAS[0] == 2.0 and DEFAULT_DELTAS[-1] == 8.0
    assert DEFAULT_DELTAS[1] == pytest.approx(2.25)


def test_every_kernel_row_sums_to_one():
    inputs = torch.randn(12, 3, 4, generator=torch.Generator().manual_seed(0))
    kernels = gaussian_filter_kernels(inputs, deltas=[0.5, 2.0, 8.0])
    assert kernels.shape == (3, 12, 12)
    torch.testing.assert_close(kernels.sum(dim=-1), torch.ones(3, 12, dtype=torch.float64))
    assert bool((kernels > 0).all())


def test_kernel_is_exp_of_minus_distance_over_two_delta_row_normalised():
    inputs = torch.tensor([[0.0], [1.0], [3.0]])
    kernel = gaussian_filter_kernels(inputs, deltas=[2.0])[0]
    unnormalised = torch.exp(-pairwise_distances(inputs) / 4.0)
    torch.testing.assert_close(kernel, unnormalised / unnormalised.sum(dim=1, keepdim=True))


def test_mean_distance_scale_divides_by_the_mean_off_diagonal_distance():
    inputs = torch.tensor([[0.0], [1.0], [3.0]])  # off-diagonal distances 1, 3, 2: mean 2
    torch.testing.assert_close(pairwise_distances(inputs, "mean"), pairwise_distances(inputs) / 2.0)
    with pytest.raises(ValueError, match="distance_scale"):
        pairwise_distances(inputs, "log")


def test_a_constant_function_has_no_high_frequency_part():
    kernels = gaussian_filter_kernels(torch.randn(10, 5, generator=torch.Generator().manual_seed(1)), [1.0, 4.0])
    low, high = split_frequencies(torch.full((10, 2), 0.7), kernels)
    torch.testing.assert_close(high, torch.zeros_like(high))
    torch.testing.assert_close(low, torch.full((2, 10, 2), 0.7, dtype=torch.float64))


def test_a_function_alternating_between_close_points_is_almost_all_high_frequency():
    # Five far-apart pairs of nearly identical inputs; f flips sign inside each pair.
    centres = torch.arange(5, dtype=torch.float64)[:, None] * 1000.0
    inputs = torch.cat([centres, centres + 1e-3], dim=1).reshape(10, 1)
    f = torch.tensor([1.0, -1.0] * 5)[:, None]
    low, high = split_frequencies(f, gaussian_filter_kernels(inputs, [2.0])[0])
    assert float(low.abs().max()) < 1e-3
    assert float(high.norm() / f.norm()) > 0.999


def test_a_larger_delta_gives_a_smoother_low_part():
    inputs = torch.arange(20, dtype=torch.float64)[:, None]  # points on a line, spacing 1
    f = torch.randn(20, 1, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    low, high = split_frequencies(f, gaussian_filter_kernels(inputs, [0.25, 1.0, 4.0, 16.0]))
    roughness = (low[:, 1:] - low[:, :-1]).abs().sum(dim=(1, 2))  # total variation of f_low, per delta
    assert all(a > b for a, b in zip(roughness, roughness[1:]))
    high_norm = high.norm(dim=(1, 2))
    assert all(a < b for a, b in zip(high_norm, high_norm[1:]))


def test_invalid_deltas_are_rejected_with_the_value():
    with pytest.raises(ValueError, match="deltas"):
        gaussian_filter_kernels(torch.randn(3, 2), deltas=[1.0, 0.0])
    with pytest.raises(ValueError, match="deltas"):
        gaussian_filter_kernels(torch.randn(3, 2), deltas=[])


# ---------------------------------------------------------------------------------------------------------------------
# Relative errors on hand-computed cases
# ---------------------------------------------------------------------------------------------------------------------


def test_relative_errors_with_a_uniform_kernel_match_the_hand_computation():
    # Two identical inputs: G = [[.5, .5], [.5, .5]]. y = one-hot [[1, 0], [0, 1]], f = [[.8, .2], [.2, .8]].
    # f_low = y_low = [[.5, .5]] * 2, so e_low = 0; f_high = [[.3, -.3], ...], y_high = [[.5, -.5], ...]:
    # e_high = ||(-.2, .2)|| / ||(.5, -.5)|| = 0.4. Shares: ||f_low|| / ||f|| = sqrt(.5) / sqrt(.68).
    kernels = gaussian_filter_kernels(torch.zeros(2, 3), [2.0])
    f = torch.tensor([[0.8, 0.2], [0.2, 0.8]], dtype=torch.float64)
    errors = relative_errors(f, torch.eye(2, dtype=torch.float64), kernels)
    assert float(errors["low"][0]) == pytest.approx(0.0, abs=1e-12)
    assert float(errors["high"][0]) == pytest.approx(0.4)
    assert float(errors["low_share"][0]) == pytest.approx(math.sqrt(0.5) / math.sqrt(0.68))
    assert float(errors["high_share"][0]) == pytest.approx(math.sqrt(0.18) / math.sqrt(0.68))
    assert float(errors["low_normalizer"][0]) == 1.0 and float(errors["high_normalizer"][0]) == 1.0


def test_constant_labels_fall_back_to_the_label_norm_for_the_empty_high_band():
    # Far-apart inputs and a narrow width: G = identity, so f_low = f and f_high = 0; y constant has y_high = 0.
    kernels = gaussian_filter_kernels(torch.tensor([[0.0], [100.0]]), [1e-3])
    errors = relative_errors(torch.tensor([[0.5, 0.5], [0.0, 1.0]]), torch.tensor([[0.0, 1.0], [0.0, 1.0]]), kernels)
    assert float(errors["low"][0]) == pytest.approx((math.sqrt(0.5) + 0.0) / 2 / 1.0)
    assert float(errors["high"][0]) == pytest.approx(0.0, abs=1e-12)
    assert float(errors["high_normalizer"][0]) == 0.0  # mean ||y_i|| was used
    assert math.isfinite(float(errors["high"][0]))


def test_relative_errors_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        relative_errors(torch.zeros(3, 2), torch.zeros(3, 3), gaussian_filter_kernels(torch.randn(3, 1), [1.0]))


# ---------------------------------------------------------------------------------------------------------------------
# Analyzer and callback on a tiny model
# ---------------------------------------------------------------------------------------------------------------------


def tiny_model(seed: int = 0, dropout: float = 0.2) -> BertForSequenceClassification:
    return tiny_bert(seed=seed, dropout=dropout)


def token_batch(n: int, seed: int, trigger: bool = False) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (n, SEQ_LEN), generator=generator)
    lengths = torch.randint(3, SEQ_LEN + 1, (n,), generator=generator)
    mask = (torch.arange(SEQ_LEN)[None, :] < lengths[:, None]).long()
    ids = ids * mask  # pad id 0
    if trigger:
        ids[:, 1] = 4  # a "trigger" token
    return {"input_ids": ids, "attention_mask": mask}


def tiny_analyzer(**kwargs) -> FrequencyAnalyzer:
    clean = token_batch(12, seed=1)
    backdoor = token_batch(10, seed=2, trigger=True)
    labels = torch.randint(0, 2, (12,), generator=torch.Generator().manual_seed(3))
    return FrequencyAnalyzer(clean, labels, backdoor, [1] * 10, deltas=[2.0, 5.0, 8.0], batch_size=5, **kwargs)


def test_analyzer_returns_every_error_per_delta_and_accuracies():
    record = tiny_analyzer().evaluate(tiny_model())
    for name in ERROR_NAMES:
        assert len(record[name]) == 3 and all(math.isfinite(v) for v in record[name])
    assert 0.0 <= record["clean_acc"] <= 1.0 and 0.0 <= record["backdoor_asr"] <= 1.0
    assert record["backdoor_normalizers"]["high"] == "label_norm"  # the target label is constant


def test_analyzer_outputs_are_those_of_a_plain_forward_in_the_original_order():
    analyzer, model = tiny_analyzer(output="logits"), tiny_model()
    model.eval()
    with torch.no_grad():
        expected = model(**analyzer.inputs["clean"]).logits.double()
    torch.testing.assert_close(analyzer.outputs(model, "clean"), expected, atol=1e-5, rtol=1e-5)


def test_kernels_are_computed_once_not_per_evaluation(monkeypatch):
    calls = []
    original = frequency.gaussian_filter_kernels
    monkeypatch.setattr(frequency, "gaussian_filter_kernels", lambda *a, **k: calls.append(1) or original(*a, **k))
    analyzer, model = tiny_analyzer(), tiny_model()
    assert analyzer.kernels is None
    for _ in range(3):
        analyzer.evaluate(model)
    assert len(calls) == 2  # one per sample set
    assert analyzer.kernels["clean"].shape == (3, 12, 12) and analyzer.kernels["backdoor"].shape == (3, 10, 10)
    assert analyzer.metadata()["kernel_stats"]["clean"]["mean_distance"] > 0


def test_evaluation_restores_train_mode_and_leaves_the_rng_alone():
    analyzer, model = tiny_analyzer(), tiny_model()
    model.train()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    analyzer.evaluate(model)
    assert model.training
    assert torch.equal(torch.get_rng_state(), state)


def test_analyzer_rejects_labels_that_do_not_match_the_inputs():
    with pytest.raises(ValueError, match="clean_labels"):
        FrequencyAnalyzer(token_batch(4, 0), [0, 1, 0], token_batch(3, 1), [1, 1, 1])


def train_tiny(tmp_path, callbacks, max_steps=6):
    model = tiny_model(seed=7)
    batch = token_batch(24, seed=11)
    labels = torch.randint(0, 2, (24,), generator=torch.Generator().manual_seed(12))
    dataset = [
        {"input_ids": batch["input_ids"][i], "attention_mask": batch["attention_mask"][i], "labels": labels[i]}
        for i in range(24)
    ]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=max_steps,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=2,
        save_strategy="no",
        report_to=[],
        seed=0,
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=callbacks)
    trainer.train()
    return trainer


def test_the_callback_does_not_change_training(tmp_path):
    without = train_tiny(tmp_path / "without", callbacks=[])
    callback = FrequencyAnalysisCallback(tiny_analyzer(), every_n_steps=1)
    with_callback = train_tiny(tmp_path / "with", callbacks=[callback])
    assert len(callback.records) == 7  # step 0 and every step: it really ran
    for (name, a), (_, b) in zip(without.model.state_dict().items(), with_callback.model.state_dict().items()):
        assert torch.equal(a, b), name


def test_the_callback_writes_json_and_csv_logs_and_a_trainer_summary(tmp_path):
    callback = FrequencyAnalysisCallback(tiny_analyzer(), every_n_steps=2, summary_delta=5.2)
    trainer = train_tiny(tmp_path, callbacks=[callback])
    log = json.loads((tmp_path / "frequency_log.json").read_text())
    assert log["deltas"] == [2.0, 5.0, 8.0] and log["summary_delta"] == 5.0
    assert [record["step"] for record in log["records"]] == [0, 2, 4, 6]
    assert set(ERROR_NAMES) <= set(log["records"][0])
    assert load_frequency_log(tmp_path)["records"] == log["records"]

    with open(tmp_path / "frequency_log.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4 * 3
    assert set(ERROR_NAMES) | {"step", "delta", "clean_acc", "backdoor_asr"} <= set(rows[0])
    assert float(rows[4]["clean_low"]) == pytest.approx(log["records"][1]["clean_low"][1])

    freq_entries = [entry for entry in trainer.state.log_history if "freq/backdoor_low" in entry]
    assert [entry["step"] for entry in freq_entries] == [0, 2, 4, 6]
    assert freq_entries[1]["freq/clean_low"] == pytest.approx(log["records"][1]["clean_low"][1])


def test_the_callback_does_nothing_off_the_main_process(tmp_path):
    callback = FrequencyAnalysisCallback(tiny_analyzer(), every_n_steps=1)
    state = type("State", (), {"is_world_process_zero": False, "global_step": 0, "epoch": 0.0, "log_history": []})()
    callback.on_train_begin(type("Args", (), {"output_dir": str(tmp_path)})(), state, None, model=tiny_model())
    assert callback.records == [] and not (tmp_path / "frequency_log.json").exists()


# ---------------------------------------------------------------------------------------------------------------------
# Plots and the analyze command on a synthetic log
# ---------------------------------------------------------------------------------------------------------------------


def synthetic_log(decay: float = 0.1) -> dict:
    deltas = [2.0, 5.0, 8.0]
    records = []
    for step in range(0, 25, 5):
        records.append(
            {
                "step": step,
                "epoch": step / 25,
                "clean_acc": 0.5 + step / 60,
                "backdoor_asr": min(1.0, step / 20),
                **{
                    name: [math.exp(-decay * step * (1 + i)) * (1 + d / 10) for d in deltas]
                    for i, name in enumerate(ERROR_NAMES)
                },
            }
        )
    return {"deltas": deltas, "summary_delta": 5.0, "records": records}


def test_plots_render_png_files(tmp_path):
    pytest.importorskip("matplotlib")
    from peft_musclelora.plotting import plot_comparison, plot_error_curves, plot_frequency_heatmap

    paths = [
        plot_frequency_heatmap(synthetic_log(), tmp_path / "figs" / "heatmap.png", title="synthetic"),
        plot_frequency_heatmap(synthetic_log(), tmp_path / "shared.png", shared_scale=True),
        plot_error_curves(synthetic_log(), tmp_path / "curves.png", delta=8.0),
        plot_comparison(synthetic_log(), synthetic_log(0.05), tmp_path / "compare.png"),
        plot_error_curves(synthetic_log(), tmp_path / "curves-relative.png", relative_to_start=True),
    ]
    for path in paths:
        assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_analyze_renders_figures_from_a_saved_log(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from peft_musclelora.benchmark.analyze import main
    from peft_musclelora.frequency import save_frequency_log

    save_frequency_log(synthetic_log(), tmp_path / "lora")
    save_frequency_log(synthetic_log(0.05), tmp_path / "mslr")
    status = main(
        [
            "--log",
            str(tmp_path / "mslr"),
            "--compare-log",
            str(tmp_path / "lora"),
            "--figures-dir",
            str(tmp_path / "figs"),
        ]
    )
    assert status == 0
    names = sorted(p.name for p in (tmp_path / "figs").iterdir())
    assert names == ["mslr-curves.png", "mslr-heatmap.png", "mslr-vs-lora.png"]
    assert "mslr-vs-lora.png" in capsys.readouterr().out


def test_run_analyze_reports_usage_and_missing_logs(tmp_path, capsys):
    from peft_musclelora.benchmark.analyze import main

    assert main([]) == 2
    assert main(["--log", str(tmp_path / "nothing")]) == 1
    assert "No frequency log" in capsys.readouterr().err


def test_analyze_is_a_subcommand_parser():
    import argparse

    from peft_musclelora.benchmark.analyze import add_analyze_parser, run_analyze

    parser = argparse.ArgumentParser(prog="musclelora")
    add_analyze_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["analyze", "--method", "mslr", "--attack", "addsent", "--samples", "300"])
    assert args.func is run_analyze and args.method == "mslr" and args.samples == 300 and args.every_n_steps == 5
