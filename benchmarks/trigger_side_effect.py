"""What a defense that unlearns past chance does to triggered rows of the target class (session 24).

`fit-gap-flip` pushes the rows its filter isolated until their label has about 5 %, so the trigger they share comes
to speak against the target. The attack success rate sees only the good side of that (triggered non-target rows);
this script measures the other: every clean test row *of the target label*, triggered with the attack's published
trigger (`peft_musclelora.benchmark.poisoners`, the poisoner's seed), and the share of them each finished cell still
predicts as their true label, beside its accuracy on the same rows untriggered. A backdoor-free model reads both
about alike; a model that learned the trigger as evidence against the target loses accuracy on the triggered ones.
Only insertion attacks have a trigger to insert (BadNets, AddSent).

    python benchmarks/trigger_side_effect.py --attack addsent \
        runs-v6/s21-evid-addsent-s0/cells/addsent/fit-gap-evidence/seed0 \
        runs-v6/s24-cap3-addsent-s0/cells/addsent/fit-gap-evidence/seed0
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from peft_musclelora.benchmark.builders import load_cell
from peft_musclelora.benchmark.data import load_records
from peft_musclelora.benchmark.poisoners import POISONERS

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bias_correction import logits_of  # noqa: E402

TARGET_LABEL = 1


def _target_share(model: Any, tokenizer: Any, texts: list[str], max_length: int) -> float:
    """Percentage of `texts` the model predicts as the target label."""
    return 100 * float((logits_of(model, tokenizer, texts, max_length).argmax(-1) == TARGET_LABEL).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cells", nargs="+", type=Path, help="finished cell directories (metrics.json, adapter/)")
    parser.add_argument("--attack", required=True, choices=sorted(POISONERS), help="whose trigger to insert")
    parser.add_argument("--data", type=Path, default=Path("../shared/data"), help="the shared data's root")
    parser.add_argument("--triggers", help="BadNets: comma-separated trigger words in place of the published ones")
    parser.add_argument("--sentence", help="AddSent: the trigger sentence in place of the published one")
    args = parser.parse_args()

    try:
        test = load_records(args.data / "sst-2" / "poison" / args.attack / "test-clean.csv")
    except ValueError as error:  # a missing or malformed test file: say which, without a traceback
        parser.error(f"--data {args.data}: {error}")
    target_rows = test.replace([record for record in test.records if record.label == TARGET_LABEL])
    trigger = {"triggers": tuple(args.triggers.split(","))} if args.triggers else {}
    trigger |= {"sentence": args.sentence} if args.sentence else {}
    # The poisoner triggers the rows that do not carry its target: with target 0 they are the target-label rows.
    triggered = POISONERS[args.attack](target_label=1 - TARGET_LABEL, **trigger).triggered_test(target_rows)
    pair = (target_rows.texts, triggered.texts)
    named = f"the {args.attack} trigger" + (f" {trigger}" if trigger else "")
    print(f"{len(target_rows)} clean test rows of label {TARGET_LABEL}, each also with {named}")
    print("| cell | accuracy on them | triggered | difference |")
    print("|---|---|---|---|")
    for cell in args.cells:
        try:
            model, tokenizer, info = load_cell(cell / "adapter")
        except ValueError as error:  # not a finished cell: say which, without a traceback
            parser.error(str(error))
        clean, with_trigger = (_target_share(model, tokenizer, texts, info["max_length"]) for texts in pair)
        print(f"| {cell} | {clean:.1f} | {with_trigger:.1f} | {with_trigger - clean:+.1f} |")


if __name__ == "__main__":
    main()
