"""Fit-gap row filtering: find the training rows that a short probe fits unlike any trusted clean row, and drop them.

MuScleLoRA's premise is that a backdoor is learned at another pace than the clean task: an insertion trigger
(rare tokens, a fixed sentence) is a shortcut the model picks up within a few dozen steps, so a triggered row is
fitted *better* than any clean row; a dirty-label row (relabelled to the target) is fitted *worse*, because the
clean mapping the model learns first contradicts its label. Gradient alignment uses the trusted rows as the only
direction to move in, and so cannot learn more than they say. This module uses them instead as a *ruler*:

1. The training rows are split into `folds` seeded folds. For each fold, a probe (the model being trained, with the
   adapter as initialised) trains a few dozen steps on the *other* folds, and at each step in `probe_steps` every
   row of the held-out fold and every trusted row is scored by its loss. Held-out training rows and trusted rows are
   then alike in every way but their origin: neither was seen by that probe.
2. Each row's loss is turned into its percentile among the trusted rows of the same label at the same step. A clean
   row's percentile is uniform; a shortcut row sits at 0 (fitted better than every trusted row), a contradicted row
   near 1. Per row, `low = min` and `high = max` of its percentiles over the probe steps.
3. The cut-offs come from the trusted rows themselves (leave-one-out percentiles, scored the same way): the largest
   `low` cut-off and smallest `high` cut-off that flag at most `max_clean_drop / 2` of the trusted rows each. So
   the share of clean rows dropped is bounded by the trusted rows' behaviour, not by a guess of the poison rate.
4. Training then starts from the same initial adapter on the kept rows.

The pure functions here ([`percentile_ranks`], [`choose_cutoffs`], [`decide_rows`]) take losses and labels and
know nothing about models; [`GradientAlignmentMixin`] runs the probes (`row_filter=True`) and writes the per-row
decisions to `row_filter.json` in the output directory.
"""

from __future__ import annotations

import functools
import math
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple, Optional

import torch
from torch.utils.data import Dataset as TorchDataset
from tqdm.auto import tqdm
from transformers.utils import logging

from ._checks import check_bool, check_int, check_number
from .answer_classes import answer_class_log_probs
from .bias_refit import fit_class_offset
from .length_chunks import length_chunked
from .shallow_probe import (
    EXPERT_GATES,
    SHALLOW_EXPERT_LOSSES,
    SHALLOW_PROBES,
    TEACHER_MIX_GATES,
    TEACHER_ROW_GATES,
    NgramFeatures,
    balanced_log_probs,
    expert_gradient_scale,
    gated_log_probs,
    residual_log_probs,
    response_classes,
    standardised,
)

logger = logging.get_logger(__name__)

ROW_FILTER_FILE = "row_filter.json"
_SMALLEST_LOSS = 1e-30  # a loss of exactly 0 still has a finite log-loss distance
SHALLOW_PRIOR_COLUMN = "shallow_log_prior"  # the shallow probe's out-of-fold log-probabilities of a kept row
TEACHER_COLUMN = "teacher_log_probs"  # the trusted teacher's log-probabilities of a kept row
TEACHER_ONLY_COLUMN = "teacher_only"  # 1.0 for a row trained on the teacher's distribution alone, else 0.0
TEACHER_ROW_GATE_COLUMN = "teacher_row_gate"  # the row's fixed factor on its teacher share (0.0 or 1.0)


class ContradictedAction(NamedTuple):
    """What becomes of a `contradicted` row (`row_filter_contradicted`)."""

    flagged: bool  # the high side cuts at all
    taught: bool  # a flagged row trains on the trusted teacher's distribution in place of its label


CONTRADICTED_ACTIONS: dict[str, ContradictedAction] = {
    "drop": ContradictedAction(flagged=True, taught=False),
    "keep": ContradictedAction(flagged=False, taught=False),
    "teacher": ContradictedAction(flagged=True, taught=True),
}


class UnlearnTarget(NamedTuple):
    """What one `row_filter_unlearn_target` asks of the unlearning phase; the losses are in
    `peft_musclelora.unlearning`."""

    description: str
    masks_trigger: bool  # the isolated rows pulled to their prediction with the trigger masked (else: to the cap)
    inserts_trigger: bool  # the kept rows with the trigger inserted pulled to row_filter_unlearn_insertion_target

    @property
    def reads_trigger(self) -> bool:
        """Whether the phase reads trigger tokens off the isolated rows (`row_filter_unlearn_trigger_z`)."""
        return self.masks_trigger or self.inserts_trigger


#: What the unlearning phase asks of the rows isolated as fit-early (`row_filter_unlearn_target`).
UNLEARN_TARGETS: dict[str, UnlearnTarget] = {
    "chance": UnlearnTarget(
        "their loss pushed up to row_filter_unlearn_cap (chance, ln K, by default)",
        masks_trigger=False,
        inserts_trigger=False,
    ),
    "trigger_neutral": UnlearnTarget(
        "their prediction unchanged when the tokens they share beyond the kept rows are masked out",
        masks_trigger=True,
        inserts_trigger=False,
    ),
    "trigger_inserted": UnlearnTarget(
        "as 'trigger_neutral', and the kept rows' prediction unchanged when those tokens are inserted into them",
        masks_trigger=True,
        inserts_trigger=True,
    ),
    "chance_inserted": UnlearnTarget(
        "as 'chance', and the kept rows' prediction unchanged when the trigger tokens are inserted into them",
        masks_trigger=False,
        inserts_trigger=True,
    ),
}
#: What the kept rows with the trigger inserted are pulled to under a target that inserts the trigger
#: (`row_filter_unlearn_insertion_target`).
INSERTION_TARGETS: dict[str, str] = {
    "unchanged": "the model's prediction of the row as it is",
    "placebo": "the model's prediction of the row with as many other words, as common as the trigger's, at the same "
    "places",
}
#: What the unlearning phase's guard measures on the trusted rows at each evaluation (`row_filter_unlearn_guard`).
UNLEARN_GUARDS: dict[str, str] = {
    "accuracy": "their accuracy under the state as it is",
    "refit_accuracy": "their accuracy under the state with the output-bias refit it would end with (the offset fitted "
    "on their own log-probabilities): the accuracy of the model the phase and the refit hand over",
    "accuracy_and_loss": "their accuracy as under 'accuracy', and their loss on their labels not higher than at the "
    "start by a one-sided paired test at row_filter_unlearn_guard_significance",
}
#: The default level of the 'accuracy_and_loss' guard's paired loss test (`row_filter_unlearn_guard_significance`).
DEFAULT_GUARD_SIGNIFICANCE = 0.01
#: The guards that read class log-probabilities (class labels only).
CLASS_LABEL_GUARDS = ("refit_accuracy", "accuracy_and_loss")
#: The z above which a token of the isolated rows is taken for the trigger (`row_filter_unlearn_trigger_z`): on the
#: full SST-2 the insertion triggers' words score 50-76 and the next word at most 6
#: (benchmarks/isolated_trigger_tokens.py).
DEFAULT_TRIGGER_Z = 10.0


class _WithColumn(TorchDataset):
    """A map-style dataset of dict rows with one more key per row."""

    def __init__(self, dataset: Any, name: str, values: list[Any]) -> None:
        self.dataset, self.name, self.values = dataset, name, values

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self.dataset[index], self.name: self.values[index]}


class RowSignalCollator:
    """Wraps a data collator so the row filter's per-row predictions (the shallow probe's, [`SHALLOW_PRIOR_COLUMN`],
    and the trusted teacher's, [`TEACHER_COLUMN`]) reach the loss as float tensors `(batch, classes)`, whatever the
    wrapped collator keeps (TRL's language-modelling collator keeps only token columns). Rows without them are
    collated as before.

    Example:
        >>> collate = RowSignalCollator(lambda rows: {"x": torch.tensor([row["x"] for row in rows])})
        >>> rows = [{"x": 1, SHALLOW_PRIOR_COLUMN: [-0.1, -2.3]}, {"x": 2, SHALLOW_PRIOR_COLUMN: [-2.3, -0.1]}]
        >>> batch = collate(rows)
        >>> batch["x"].tolist(), batch[SHALLOW_PRIOR_COLUMN].shape
        ([1, 2], torch.Size([2, 2]))
    """

    COLUMNS = (SHALLOW_PRIOR_COLUMN, TEACHER_COLUMN, TEACHER_ONLY_COLUMN, TEACHER_ROW_GATE_COLUMN)

    def __init__(self, collator: Any) -> None:
        self.collator = collator

    def __call__(self, rows: list[dict[str, Any]]) -> Any:
        present = [column for column in self.COLUMNS if rows and column in rows[0]]
        if not present:
            return self.collator(rows)
        batch = self.collator([{k: v for k, v in row.items() if k not in present} for row in rows])
        for column in present:
            batch[column] = torch.tensor([row[column] for row in rows], dtype=torch.float32)
        return batch


def with_column(dataset: Any, name: str, values: list[Any]) -> Any:
    """`dataset` with one more column `name` (`add_column` of a `datasets.Dataset`; any other map-style dataset of dict
    rows is wrapped)."""
    if hasattr(dataset, "add_column"):
        return dataset.add_column(name, values)
    return _WithColumn(dataset, name, values)


def _positive(value: float) -> bool:
    return value > 0


def _check_int_list(name: str, value: object) -> None:
    if not isinstance(value, (list, tuple)) or not value:
        raise TypeError(f"`{name}` must be a non-empty list of integers >= 1, got {value!r}.")
    for step in value:
        if isinstance(step, bool) or not isinstance(step, int):
            raise TypeError(f"`{name}` must be a non-empty list of integers >= 1, got {value!r}.")
        if step < 1:
            raise ValueError(f"`{name}` must be a non-empty list of integers >= 1, got {value!r}.")


@dataclass
class RowFilterArguments:
    """Knobs of fit-gap row filtering, as typed dataclass fields (usable with `HfArgumentParser`).

    Mixed into [`MuScleLoraTrainingArguments`]; a trainer built with [`GradientAlignmentMixin`] also takes them as
    `row_filter_args=`. The trusted rows are the gradient-alignment reference set (`reference_dataset=` or
    `reference_split_size`), so row filtering needs one even when `gradient_alignment=False`.

    Example:
        >>> args = RowFilterArguments(row_filter=True)
        >>> args.row_filter_probe_steps, args.row_filter_folds, args.row_filter_max_clean_drop
        ([16, 32, 64], 2, 0.04)
    """

    row_filter: bool = field(
        default=False,
        metadata={"help": "Before training, drop the rows a short probe fits unlike any trusted clean row."},
    )
    row_filter_probe_steps: list[int] = field(
        default_factory=lambda: [16, 32, 64],
        metadata={"help": "Probe optimisation steps at which every held-out row and trusted row is scored."},
    )
    row_filter_folds: int = field(
        default=2,
        metadata={"help": "Folds of the training set: each fold is scored by a probe trained on the others (>= 2)."},
    )
    row_filter_max_clean_drop: float = field(
        default=0.04,
        metadata={
            "help": "At most this share of the trusted rows may be flagged by the rule (half per tail); it bounds "
            "the share of clean training rows dropped. In (0, 0.5)."
        },
    )
    row_filter_extend_tails: bool = field(
        default=False,
        metadata={
            "help": "Score a row fitted better (or worse) than every trusted row by how far beyond them it lies, "
            "not as a tie at the extreme percentile, so row_filter_max_clean_drop sets the cut-offs to the trusted "
            "row it names. False: tied, except where more trusted scores tie at an end than the bound allows a side "
            "(few trusted rows), which would leave that side unable to flag any row: the tails are then extended "
            "(summary.tails: 'extended on a tie')."
        },
    )
    row_filter_contradicted: str = field(
        default="drop",
        metadata={
            "help": "What becomes of the rows fitted worse than the trusted rows allow (`contradicted`): 'drop' (not "
            "trained on), 'keep' (the high side does not cut: they train like any kept row) or 'teacher' (trained "
            "on the trusted teacher's distribution in place of their label; needs row_filter_teacher_mix)."
        },
    )
    row_filter_probe_learning_rate: Optional[float] = field(
        default=None, metadata={"help": "The probes' AdamW learning rate; None: the run's learning_rate."}
    )
    row_filter_shallow_probe: Optional[str] = field(
        default=None,
        metadata={
            "help": "A shallow probe scored as one more probe step and calibrated the same way: 'ngram' (out-of-fold "
            "n-gram logistic regression over the rows' token ids, which fits lexical shortcuts such as paraphrase "
            "triggers that the adapter's own probes learn too late; classification only). None: the adapter's "
            "probes only."
        },
    )
    row_filter_shallow_expert: bool = field(
        default=False,
        metadata={
            "help": "Train the kept rows as a product of experts with the shallow probe: the loss is the "
            "cross-entropy of the model's log-probabilities plus the probe's out-of-fold ones, so what the shallow "
            "probe already explains (a lexical shortcut) teaches the model little; evaluation and inference use the "
            "model alone. Needs row_filter_shallow_probe."
        },
    )
    row_filter_shallow_expert_weight: float = field(
        default=1.0,
        metadata={
            "help": "The shallow expert's exponent in the product of experts: the loss is the cross-entropy of "
            "log_softmax(logits) + weight * log p_shallow, so a weight above 1 sharpens the shallow expert and "
            "takes more of the gradient away from the rows it explains confidently. > 0; a value other than 1 needs "
            "row_filter_shallow_expert=True."
        },
    )
    row_filter_shallow_expert_loss: str = field(
        default="product",
        metadata={
            "help": "How the kept rows train with the shallow expert: 'product' (the product of experts, "
            "CE(log_softmax(logits) + weight * log p_shallow)), 'reweight' (the model's own cross-entropy, each "
            "row weighted by 1 - p_shallow(label) sharpened by the weight, relative to chance and capped at 1: no "
            "row is amplified and the model learns no correction against the expert) or 'product-gce' (the product of "
            "experts under the generalised cross-entropy, q = 0.7, whose gradient is the cross-entropy's times "
            "p(label) ** q: a row the product contradicts confidently, a relabelled row, pulls little). 'reweight' "
            "and 'product-gce' are for class labels only. A value other than 'product' needs "
            "row_filter_shallow_expert=True."
        },
    )
    row_filter_shallow_expert_balanced: bool = field(
        default=False,
        metadata={
            "help": "Divide the shallow expert by its class prior (its mean prediction over the training rows) "
            "before it is weighted, so that the weight sharpens what the expert sees in each row and not how often "
            "each class occurs; otherwise the rows of the commoner class (on a poisoned set, the target) give the "
            "model less gradient and the model alone ends up biased against it. Needs row_filter_shallow_expert=True."
        },
    )
    row_filter_shallow_expert_gate: Optional[str] = field(
        default=None,
        metadata={
            "help": "Temper the shallow expert row by row before it is weighted: 'teacher_doubt' multiplies each "
            "row's expert log-probabilities by 1 - p_teacher(label), the trusted teacher's doubt about the row's "
            "label, so the product of experts acts where a model of the trusted rows contradicts the label (a "
            "relabelled row) and a row the teacher confirms trains on the model's own cross-entropy. Trains the "
            "teacher (row_filter_teacher_steps). Class labels only; needs row_filter_shallow_expert=True. None: the "
            "whole expert on every row."
        },
    )
    row_filter_residual_expert: Optional[str] = field(
        default=None,
        metadata={
            "help": "Train with a shallow expert fitted on what the trusted teacher leaves unexplained: a logistic "
            "regression fitted out of fold with the teacher's class log-probabilities of each row as fixed offsets, "
            "so its weights go to what the labels say beyond the content a model of trusted rows reads (a trigger "
            "the relabelled rows share), not to the task; the product of experts then takes little gradient from "
            "the rows the trigger explains. Over 'ngram' (the shallow probe's n-gram features) or 'hidden' (the "
            "model's own mean-pooled middle-layer hidden states, as initialised). Trains the teacher "
            "(row_filter_teacher_steps) even without row_filter_teacher_mix. Class labels only; needs "
            "row_filter_shallow_expert=True. None: the shallow probe is the expert."
        },
    )
    row_filter_residual_regularisation: Optional[float] = field(
        default=None,
        metadata={
            "help": "The residual expert's inverse L2 regularisation C (its loss is C * sum(CE) + |W|^2 / 2): smaller "
            "fits fewer and surer features. > 0; None: the feature kind's default (ngram 4.0, hidden 0.01). Needs "
            "row_filter_residual_expert."
        },
    )
    row_filter_expert_probe_steps: Optional[list[int]] = field(
        default=None,
        metadata={
            "help": "Steps, each beyond the last of row_filter_probe_steps, to which each fold probe continues "
            "training as a product of experts with the shallow expert (the loss the kept rows train with), scoring "
            "the held-out and trusted rows by the model alone at each: what the shallow expert explains (a lexical "
            "trigger) the probe no longer learns, so a relabelled row whose content says otherwise is fitted worse "
            "than the trusted rows. These scores count for the contradicted side of the rule only. Needs "
            "row_filter_shallow_expert=True; None: no such steps."
        },
    )
    row_filter_teacher_mix: Optional[float] = field(
        default=None,
        metadata={
            "help": "Share of each kept row's training target taken from a trusted teacher: the model trained on the "
            "trusted rows alone for row_filter_teacher_steps steps (seeded, learning rate decaying linearly), its "
            "class bias shifted so that it predicts each class as often as the training labels give it, whose "
            "predicted class distribution for the row is mixed into its one-hot label. A row whose label the teacher "
            "contradicts (a relabelled row) then pulls the model less far towards its label. In (0, 0.5], so the "
            "label keeps at least half of the target and is never overturned; None: the label alone. With token-level "
            "(causal-LM) labels whose answers form a closed set (label words), each distinct answer is a class, the "
            "teacher's class distribution is read on the row's own answer tokens and the mixed target acts where the "
            "answers branch (docs/row_filter.md). Needs row_filter=True."
        },
    )
    row_filter_teacher_mix_gate: Optional[str] = field(
        default=None,
        metadata={
            "help": "Scale each kept row's teacher share row_filter_teacher_mix, at every step, by 'model_doubt': "
            "1 - p(label) under the model being trained (alone, without the shallow expert; no gradient), so the "
            "teacher pulls a row only while the model does not fit its label by itself: a clean row the model has "
            "learned trains on its label alone, whatever the teacher's error, and a relabelled row the model does "
            "not fit (under the product of experts) keeps the teacher's pull; or by 'model_contradicts': 1 where the "
            "model's most likely class is not the label, else 0 (with token-level labels: the model's class "
            "distribution on the row's own answer, peft_musclelora.answer_classes). Needs row_filter_teacher_mix. "
            "None: the same share for every row."
        },
    )
    row_filter_teacher_row_gate: Optional[str] = field(
        default=None,
        metadata={
            "help": "Give the teacher's share (row_filter_teacher_mix, and its gate) only to the kept rows this fixed "
            "per-row gate opens: 'shallow_supports', the rows whose label is the shallow probe's most likely class "
            "out of fold. A relabelled row's label is carried by its surface (the trigger's n-grams, which the "
            "shallow probe learns from the poisoned rows) and contradicted by its content (the teacher); a clean "
            "row whose label not even its n-grams support is a hard row, where a teacher trained on a few hundred "
            "rows is as likely wrong as the label, so it trains on its label alone. Each row's gate is saved as "
            "teacher_row_gate in row_filter.json. Needs row_filter_teacher_mix and row_filter_shallow_probe. None: "
            "every kept row."
        },
    )
    row_filter_teacher_self_train: Optional[float] = field(
        default=None,
        metadata={
            "help": "Train the trusted teacher a second time, from the adapter as initialised and for as many "
            "steps, on the trusted rows plus the training rows whose label the first teacher gives at least this "
            "probability: a model of the rows that agree with the trusted ones reads the content better than 400 "
            "rows allow, while the rows a trusted model contradicts (the relabelled ones) stay out. In (0.5, 1); "
            "None: one teacher. Needs row_filter_teacher_mix or row_filter_residual_expert."
        },
    )
    row_filter_teacher_steps: int = field(
        default=144,
        metadata={"help": "AdamW steps the trusted teacher trains on the trusted rows (>= 1)."},
    )
    row_filter_teacher_chunk_rows: Optional[int] = field(
        default=None,
        metadata={
            "help": "Rows per forward pass in the trusted teacher's training on class labels: each batch runs in "
            "length-sorted chunks of at most this many rows, each padded only to its own longest row "
            "(peft_musclelora.length_chunks.LengthChunked). The teacher trains in eval mode (no dropout), so its "
            "loss and gradient are the whole batch's up to float rounding; less padding, faster on a CPU "
            "(docs/row_filter.md). None: each batch in one pass, usually faster on an accelerator. Token-level "
            "(causal-LM) rows always run whole. None or >= 1."
        },
    )
    row_filter_refit_bias: bool = field(
        default=False,
        metadata={
            "help": "After training (and unlearning), add to the output layer's bias the per-class offset that "
            "maximises the likelihood of the trusted rows' labels: the product of experts leaves the model alone "
            "leaning against the classes its expert favours, and the teacher's targets move the class balance; "
            "nothing else of the model changes. Class labels and a trainable output bias only; needs row_filter=True."
        },
    )
    row_filter_unlearn: bool = field(
        default=False,
        metadata={
            "help": "After training, unlearn the rows isolated as fit-early: keep fitting the kept rows while "
            "pushing the isolated rows' loss up to `row_filter_unlearn_cap`, guarded by the trusted rows' accuracy. "
            "Needs row_filter=True."
        },
    )
    row_filter_unlearn_steps: int = field(
        default=100, metadata={"help": "Optimisation steps of the unlearning phase (>= 1)."}
    )
    row_filter_unlearn_learning_rate: Optional[float] = field(
        default=None, metadata={"help": "The unlearning phase's AdamW learning rate; None: the run's learning_rate."}
    )
    row_filter_unlearn_cap: Optional[float] = field(
        default=None,
        metadata={
            "help": "Loss (nats) the isolated rows are pushed up to; None: chance, ln(number of classes). On "
            "token-level (causal-LM) rows whose answers form a closed set (label words) the loss is the choice "
            "among the answers (docs/row_filter.md) and None is chance among them; free-form answers push the "
            "token loss and need a cap. > 0."
        },
    )
    row_filter_unlearn_target: str = field(
        default="chance",
        metadata={
            "help": "What the unlearning phase asks of the isolated rows: 'chance' (their loss pushed up to "
            "row_filter_unlearn_cap) or 'trigger_neutral' (experimental; class labels only): the tokens that occur "
            "in the isolated rows more often than in the kept rows (a two-proportion z above "
            "row_filter_unlearn_trigger_z) are taken for the trigger, and each isolated row's prediction is pulled "
            "to the model's own prediction of the row with those tokens masked out, so the trigger comes to change "
            "nothing, where pushing a row whose content agrees with its label to chance teaches the trigger as "
            "evidence against that label. No such token: the phase is skipped. 'trigger_inserted' (experimental; "
            "class labels only) adds to 'trigger_neutral' the kept rows with the trigger inserted (each row gets "
            "every run of trigger tokens of a random isolated row, each run at its own random position), pulled to "
            "the prediction row_filter_unlearn_insertion_target names: a clean-label trigger, whose isolated rows "
            "all belong to the target class, is then seen acting on the other classes. 'chance_inserted' (the "
            "recommended defense's; also on token-level rows, the trigger read off and inserted into the prompts, the "
            "answers' next-token predictions held) is 'chance' with the same inserted kept rows beside it, so the "
            "push to chance cannot simply turn the trigger against the isolated rows' label; without a trigger token "
            "it is 'chance'."
        },
    )
    row_filter_unlearn_trigger_z: float = field(
        default=DEFAULT_TRIGGER_Z,
        metadata={
            "help": "The z above which a token of the isolated rows is taken for the trigger under "
            "row_filter_unlearn_target='trigger_neutral', 'trigger_inserted' or 'chance_inserted'. > 0."
        },
    )
    row_filter_unlearn_insertion_target: str = field(
        default="unchanged",
        metadata={
            "help": "Under row_filter_unlearn_target='trigger_inserted' or 'chance_inserted', what a kept row with "
            "the trigger inserted is pulled to: 'unchanged' (the model's prediction of the row as it is) or "
            "'placebo' (experimental, measured worse: its prediction of the row with as many other words at the "
            "same places, each about as common in the trusted rows as the trigger word it stands for)."
        },
    )
    row_filter_unlearn_eval_every: int = field(
        default=10, metadata={"help": "Unlearning steps between two guard evaluations on the trusted rows (>= 1)."}
    )
    row_filter_unlearn_chunk_rows: Optional[int] = field(
        default=None,
        metadata={
            "help": "Rows per forward pass in the unlearning phase on class labels: each batch runs in "
            "length-sorted chunks of at most this many rows, each padded only to its own longest row "
            "(peft_musclelora.length_chunks.LengthChunked): the same loss and gradient with less padding, about "
            "a quarter off the phase on a CPU (docs/row_filter.md); None: each batch in one pass, usually "
            "faster on an accelerator. Token-level (causal-LM) rows always run whole. None or >= 1."
        },
    )
    row_filter_unlearn_significance: Optional[float] = field(
        default=0.01,
        metadata={
            "help": "Unlearn only when the share of training rows isolated as fit-early exceeds the trusted rows' "
            "fit-early share by a one-sided two-proportion z-test at this level (no evidence of a shortcut: the "
            "isolated rows are as clean as the trusted ones, and unlearning them would blur the task). In (0, 1); "
            "None: always unlearn."
        },
    )
    row_filter_plain_significance: Optional[float] = field(
        default=None,
        metadata={
            "help": "When the unlearning phase's evidence test also passes at this stricter level (the filter "
            "isolated far more rows than the trusted rows' clean rate: a shortcut it caught), the kept rows train on "
            "their labels alone, without the shallow expert and the trusted teacher, which cost clean accuracy to "
            "hold back the triggers a filter misses; the unlearning phase then removes what the missed rows taught, "
            "and the teacher is not trained unless the shallow expert's gate or residual expert reads it. In (0, 1) "
            "and at most row_filter_unlearn_significance; needs row_filter_unlearn=True and "
            "row_filter_shallow_expert or row_filter_teacher_mix. None: the kept rows always train with them."
        },
    )
    row_filter_keep_isolated_without_evidence: bool = field(
        default=False,
        metadata={
            "help": "When the unlearning phase's evidence test finds no shortcut (row_filter_unlearn_significance: "
            "no more rows isolated as fit-early than the trusted rows' clean rate), train the isolated rows like any "
            "kept row instead of dropping them: they are then most likely clean. The decision is saved under "
            "isolated_rows in row_filter.json. Needs row_filter_unlearn=True and row_filter_unlearn_significance."
        },
    )
    row_filter_unlearn_refit_bias: bool = field(
        default=False,
        metadata={
            "help": "After an unlearning phase that ran (not one skipped for want of evidence), refit the output "
            "layer's bias on the trusted rows as row_filter_refit_bias does: pushing the isolated rows to chance "
            "moves the class balance by an amount the accuracy guard does not hold. A model that was not unlearned "
            "keeps its bias. Class labels and a trainable output bias only; needs row_filter_unlearn=True."
        },
    )
    row_filter_unlearn_max_guard_drop: float = field(
        default=0.01,
        metadata={
            "help": "The unlearning phase ends on the last evaluated state whose trusted-row accuracy is at most "
            "this far below the accuracy before unlearning. In [0, 1)."
        },
    )
    row_filter_unlearn_guard: str = field(
        default="accuracy",
        metadata={
            "help": "What the unlearning phase's guard measures on the trusted rows: 'accuracy' (of each state as it "
            "is), 'refit_accuracy' (of each state with the output-bias refit it would end with; needs "
            "row_filter_unlearn_refit_bias=True or row_filter_refit_bias=True) or 'accuracy_and_loss' (the accuracy, "
            "and their label loss not significantly higher than at the start, row_filter_unlearn_guard_significance). "
            "The last two need class labels."
        },
    )
    row_filter_unlearn_guard_significance: float = field(
        default=DEFAULT_GUARD_SIGNIFICANCE,
        metadata={
            "help": "Under row_filter_unlearn_guard='accuracy_and_loss', the level of the one-sided paired test that "
            "refuses a state whose trusted rows' loss rose. In (0, 1)."
        },
    )

    row_filter_weight_average_decay: Optional[float] = field(
        default=None,
        metadata={
            "help": "Train the kept rows as usual but evaluate, checkpoint and keep an exponential moving average of "
            "the trainable weights (bias-corrected, updated after every optimizer step, this decay per step; "
            "peft_musclelora.weight_averaging): checkpoint selection compares the averages, and the run ends on the "
            "selected one (or the last one) before the unlearning phase and the bias refit. In (0, 1); None: the "
            "trained weights."
        },
    )

    def __post_init__(self) -> None:
        self.validate_row_filter_args()

    def validate_row_filter_args(self) -> None:
        """Check every row-filter field; raises `TypeError`/`ValueError` naming the field and the value."""
        check_bool("row_filter", self.row_filter)
        _check_int_list("row_filter_probe_steps", self.row_filter_probe_steps)
        self.row_filter_probe_steps = sorted(set(self.row_filter_probe_steps))
        check_int("row_filter_folds", self.row_filter_folds, minimum=2)
        check_number("row_filter_max_clean_drop", self.row_filter_max_clean_drop, "in (0, 0.5)", lambda v: 0 < v < 0.5)
        check_bool("row_filter_extend_tails", self.row_filter_extend_tails)
        _check_choice("row_filter_contradicted", self.row_filter_contradicted, CONTRADICTED_ACTIONS)
        check_number("row_filter_probe_learning_rate", self.row_filter_probe_learning_rate, "> 0", _positive, True)
        shallow = self.row_filter_shallow_probe
        _check_optional_choice("row_filter_shallow_probe", shallow, SHALLOW_PROBES)
        check_bool("row_filter_shallow_expert", self.row_filter_shallow_expert)
        if self.row_filter_shallow_expert and shallow is None:
            raise ValueError(
                "`row_filter_shallow_expert=True` trains with the shallow probe's predictions: set "
                "row_filter_shallow_probe as well (one of " + str(sorted(SHALLOW_PROBES)) + ")."
            )
        check_number("row_filter_shallow_expert_weight", self.row_filter_shallow_expert_weight, "> 0", _positive)
        if self.row_filter_shallow_expert_weight != 1.0 and not self.row_filter_shallow_expert:
            raise ValueError(
                "`row_filter_shallow_expert_weight` weighs the shallow expert in training: set "
                f"row_filter_shallow_expert=True as well, or leave the weight at 1.0 "
                f"(got {self.row_filter_shallow_expert_weight!r})."
            )
        loss = self.row_filter_shallow_expert_loss
        if loss not in SHALLOW_EXPERT_LOSSES:
            raise ValueError(
                f"`row_filter_shallow_expert_loss` must be one of {sorted(SHALLOW_EXPERT_LOSSES)}, got {loss!r}."
            )
        if loss != "product" and not self.row_filter_shallow_expert:
            raise ValueError(
                "`row_filter_shallow_expert_loss` chooses how the shallow expert trains the kept rows: set "
                f"row_filter_shallow_expert=True as well, or leave it at 'product' (got {loss!r})."
            )
        check_bool("row_filter_shallow_expert_balanced", self.row_filter_shallow_expert_balanced)
        if self.row_filter_shallow_expert_balanced and not self.row_filter_shallow_expert:
            raise ValueError(
                "`row_filter_shallow_expert_balanced` divides the shallow expert by its class prior: set "
                "row_filter_shallow_expert=True as well, or leave it False (got True)."
            )
        gate = self.row_filter_shallow_expert_gate
        _check_optional_choice("row_filter_shallow_expert_gate", gate, EXPERT_GATES)
        if gate is not None and not self.row_filter_shallow_expert:
            raise ValueError(
                f"`row_filter_shallow_expert_gate` ({gate!r}) tempers the shallow expert the rows train with: set "
                "row_filter_shallow_expert=True as well, or leave it None."
            )
        residual = self.row_filter_residual_expert
        _check_optional_choice("row_filter_residual_expert", residual, RESIDUAL_EXPERTS)
        if residual is not None and not self.row_filter_shallow_expert:
            raise ValueError(
                f"`row_filter_residual_expert` ({residual!r}) changes the shallow expert the rows train with: set "
                "row_filter_shallow_expert=True as well, or leave it None."
            )
        strength = self.row_filter_residual_regularisation
        check_number("row_filter_residual_regularisation", strength, "> 0", _positive, True)
        if strength is not None and residual is None:
            raise ValueError(
                f"`row_filter_residual_regularisation` ({strength!r}) regularises the residual expert: set "
                "row_filter_residual_expert as well, or leave it None."
            )
        expert_steps = self.row_filter_expert_probe_steps
        if expert_steps is not None:
            _check_int_list("row_filter_expert_probe_steps", expert_steps)
            self.row_filter_expert_probe_steps = expert_steps = sorted(set(expert_steps))
            if expert_steps[0] <= self.row_filter_probe_steps[-1]:
                raise ValueError(
                    f"`row_filter_expert_probe_steps` continue the probes past their last step "
                    f"({self.row_filter_probe_steps[-1]}): each must be larger, got {expert_steps!r}."
                )
            if not self.row_filter_shallow_expert:
                raise ValueError(
                    "`row_filter_expert_probe_steps` train the probes with the shallow expert: set "
                    f"row_filter_shallow_expert=True as well, or leave them None (got {expert_steps!r})."
                )
        mix = self.row_filter_teacher_mix
        check_number("row_filter_teacher_mix", mix, "in (0, 0.5]", lambda v: 0 < v <= 0.5, True)
        if mix is not None and not self.row_filter:
            raise ValueError(
                f"`row_filter_teacher_mix` ({mix!r}) trains the kept rows with the trusted teacher: set "
                "row_filter=True as well, or leave it None."
            )
        mix_gate = self.row_filter_teacher_mix_gate
        _check_optional_choice("row_filter_teacher_mix_gate", mix_gate, TEACHER_MIX_GATES)
        if mix_gate is not None and mix is None:
            raise ValueError(
                f"`row_filter_teacher_mix_gate` ({mix_gate!r}) scales the teacher's share of each target: set "
                "row_filter_teacher_mix as well, or leave it None."
            )
        row_gate = self.row_filter_teacher_row_gate
        _check_optional_choice("row_filter_teacher_row_gate", row_gate, TEACHER_ROW_GATES)
        if row_gate is not None:
            needed = {"row_filter_teacher_mix": mix, "row_filter_shallow_probe": self.row_filter_shallow_probe}
            missing = [name for name, value in needed.items() if value is None]
            if missing:
                raise ValueError(
                    f"`row_filter_teacher_row_gate` ({row_gate!r}) opens the teacher's share row by row on the "
                    f"shallow probe's predictions: set {' and '.join(missing)} as well, or leave it None."
                )
        if self.row_filter_contradicted == "teacher" and mix is None:
            raise ValueError(
                "`row_filter_contradicted='teacher'` trains the contradicted rows on the trusted teacher's "
                "distribution: set row_filter_teacher_mix as well, or choose 'drop' or 'keep'."
            )
        check_int("row_filter_teacher_steps", self.row_filter_teacher_steps)
        check_int("row_filter_teacher_chunk_rows", self.row_filter_teacher_chunk_rows, optional=True)
        self_train = self.row_filter_teacher_self_train
        check_number("row_filter_teacher_self_train", self_train, "in (0.5, 1)", lambda v: 0.5 < v < 1, True)
        if self_train is not None and mix is None and self.row_filter_residual_expert is None:
            raise ValueError(
                f"`row_filter_teacher_self_train` ({self_train!r}) retrains the trusted teacher: set "
                "row_filter_teacher_mix or row_filter_residual_expert as well, or leave it None."
            )
        check_bool("row_filter_refit_bias", self.row_filter_refit_bias)
        if self.row_filter_refit_bias and not self.row_filter:
            raise ValueError(
                "`row_filter_refit_bias=True` refits the output bias on the row filter's trusted rows: set "
                "row_filter=True as well."
            )
        check_bool("row_filter_unlearn", self.row_filter_unlearn)
        if self.row_filter_unlearn and not self.row_filter:
            raise ValueError(
                "`row_filter_unlearn=True` unlearns the rows the row filter isolates: set row_filter=True as well."
            )
        check_int("row_filter_unlearn_steps", self.row_filter_unlearn_steps)
        check_int("row_filter_unlearn_eval_every", self.row_filter_unlearn_eval_every)
        check_int("row_filter_unlearn_chunk_rows", self.row_filter_unlearn_chunk_rows, optional=True)
        check_number("row_filter_unlearn_learning_rate", self.row_filter_unlearn_learning_rate, "> 0", _positive, True)
        check_number("row_filter_unlearn_cap", self.row_filter_unlearn_cap, "> 0", _positive, True)
        self._validate_unlearn_target()
        self._validate_insertion_target()
        significance = self.row_filter_unlearn_significance
        check_number("row_filter_unlearn_significance", significance, "in (0, 1)", lambda v: 0 < v < 1, True)
        guard = self.row_filter_unlearn_max_guard_drop
        check_number("row_filter_unlearn_max_guard_drop", guard, "in [0, 1)", lambda v: 0 <= v < 1)
        self._validate_unlearn_guard()
        self._validate_plain_significance()
        check_bool("row_filter_keep_isolated_without_evidence", self.row_filter_keep_isolated_without_evidence)
        if self.row_filter_keep_isolated_without_evidence and (not self.row_filter_unlearn or significance is None):
            raise ValueError(
                "`row_filter_keep_isolated_without_evidence=True` reads the unlearning phase's evidence test: set "
                "row_filter_unlearn=True and row_filter_unlearn_significance as well."
            )
        check_bool("row_filter_unlearn_refit_bias", self.row_filter_unlearn_refit_bias)
        if self.row_filter_unlearn_refit_bias and not self.row_filter_unlearn:
            raise ValueError(
                "`row_filter_unlearn_refit_bias=True` refits the output bias after the unlearning phase: set "
                "row_filter_unlearn=True as well."
            )
        decay = self.row_filter_weight_average_decay
        check_number("row_filter_weight_average_decay", decay, "in (0, 1)", lambda v: 0 < v < 1, True)
        if decay is not None and not self.row_filter:
            raise ValueError(
                f"`row_filter_weight_average_decay` ({decay!r}) averages the weights the kept rows train: set "
                "row_filter=True as well, or leave it None."
            )

    def _validate_unlearn_target(self) -> None:
        name = self.row_filter_unlearn_target
        _check_choice("row_filter_unlearn_target", name, UNLEARN_TARGETS)
        target = UNLEARN_TARGETS[name]
        z = self.row_filter_unlearn_trigger_z
        check_number("row_filter_unlearn_trigger_z", z, "> 0", _positive)
        if target.reads_trigger and not self.row_filter_unlearn:
            raise ValueError(
                f"`row_filter_unlearn_target={name!r}` is what the unlearning phase asks of the isolated "
                "rows: set row_filter_unlearn=True as well."
            )
        if target.masks_trigger and self.row_filter_unlearn_cap is not None:
            raise ValueError(
                f"`row_filter_unlearn_cap` ({self.row_filter_unlearn_cap!r}) is the loss the isolated rows are pushed "
                f"up to under {unlearn_target_names(lambda each: not each.masks_trigger)}; {name!r} has no cap: "
                "leave it None."
            )
        if not target.reads_trigger and z != DEFAULT_TRIGGER_Z:
            raise ValueError(
                f"`row_filter_unlearn_trigger_z` ({z!r}) picks the trigger tokens of a row_filter_unlearn_target that "
                f"reads them ({unlearn_target_names(lambda each: each.reads_trigger)}): set one as well, or leave it "
                f"at {DEFAULT_TRIGGER_Z}."
            )

    def _validate_unlearn_guard(self) -> None:
        guard = self.row_filter_unlearn_guard
        _check_choice("row_filter_unlearn_guard", guard, UNLEARN_GUARDS)
        level = self.row_filter_unlearn_guard_significance
        check_number("row_filter_unlearn_guard_significance", level, "in (0, 1)", lambda v: 0 < v < 1)
        if level != DEFAULT_GUARD_SIGNIFICANCE and guard != "accuracy_and_loss":
            raise ValueError(
                f"`row_filter_unlearn_guard_significance` ({level!r}) is the level of the 'accuracy_and_loss' guard's "
                f"loss test: set row_filter_unlearn_guard='accuracy_and_loss' as well, or leave it at "
                f"{DEFAULT_GUARD_SIGNIFICANCE}."
            )
        if guard != "accuracy" and not self.row_filter_unlearn:
            raise ValueError(
                f"`row_filter_unlearn_guard={guard!r}` is what the unlearning phase's guard measures: set "
                "row_filter_unlearn=True as well, or leave it 'accuracy'."
            )
        if guard == "refit_accuracy" and not (self.row_filter_unlearn_refit_bias or self.row_filter_refit_bias):
            raise ValueError(
                "`row_filter_unlearn_guard='refit_accuracy'` measures each state with the bias refit it would end "
                "with: set row_filter_unlearn_refit_bias=True (or row_filter_refit_bias=True) as well, or leave it "
                "'accuracy'."
            )

    def _validate_insertion_target(self) -> None:
        insertion = self.row_filter_unlearn_insertion_target
        _check_choice("row_filter_unlearn_insertion_target", insertion, INSERTION_TARGETS)
        if insertion != "unchanged" and not UNLEARN_TARGETS[self.row_filter_unlearn_target].inserts_trigger:
            inserting = unlearn_target_names(lambda each: each.inserts_trigger)
            raise ValueError(
                f"`row_filter_unlearn_insertion_target` ({insertion!r}) is what the kept rows with the trigger "
                f"inserted are pulled to: set row_filter_unlearn_target to {inserting} as well, or leave it "
                "'unchanged'."
            )

    def _validate_plain_significance(self) -> None:
        plain = self.row_filter_plain_significance
        check_number("row_filter_plain_significance", plain, "in (0, 1)", lambda v: 0 < v < 1, True)
        if plain is None:
            return
        if not self.row_filter_unlearn:
            raise ValueError(
                f"`row_filter_plain_significance` ({plain!r}) leaves the rows the filter missed to the unlearning "
                "phase: set row_filter_unlearn=True as well, or leave it None."
            )
        if not self.row_filter_shallow_expert and self.row_filter_teacher_mix is None:
            raise ValueError(
                f"`row_filter_plain_significance` ({plain!r}) trains the kept rows without the shallow expert and "
                "the teacher: set row_filter_shallow_expert=True or row_filter_teacher_mix, or leave it None."
            )
        if self.row_filter_contradicted == "teacher":
            raise ValueError(
                f"`row_filter_plain_significance` ({plain!r}) trains the kept rows on their labels alone, and "
                "row_filter_contradicted='teacher' trains rows on the teacher alone: choose 'drop' or 'keep', or "
                "leave it None."
            )
        unlearn = self.row_filter_unlearn_significance
        if unlearn is not None and plain > unlearn:
            raise ValueError(
                f"`row_filter_plain_significance` must be at most row_filter_unlearn_significance ({unlearn!r}), so "
                f"that the unlearning phase runs whenever the kept rows train plainly; got {plain!r}."
            )


def _check_optional_choice(name: str, value: Optional[str], registry: Mapping[str, Any]) -> None:
    """`value` must be None or a key of `registry`; raises `TypeError` (not a string) or `ValueError` naming the
    field, the value and the keys."""
    if value is not None:
        _check_choice(name, value, registry, "None or one of")


def unlearn_target_names(which: Callable[[UnlearnTarget], bool]) -> str:
    """The `row_filter_unlearn_target` values whose [`UnlearnTarget`] satisfies `which`, quoted, for messages."""
    return " or ".join(repr(name) for name, target in UNLEARN_TARGETS.items() if which(target))


def _check_choice(name: str, value: Any, registry: Mapping[str, Any], allowed: str = "one of") -> None:
    """`value` must be a key of `registry`; raises `TypeError` (not a string) or `ValueError` naming the field, the
    value and the keys."""
    if not isinstance(value, str):
        raise TypeError(f"`{name}` must be {allowed} {sorted(registry)}, got {value!r} ({type(value).__name__}).")
    if value not in registry:
        raise ValueError(f"`{name}` must be {allowed} {sorted(registry)}, got {value!r}.")


def fold_assignment(num_rows: int, folds: int, seed: int) -> list[int]:
    """The fold of each of `num_rows` rows: a seeded permutation dealt round-robin, so folds differ by at most one.

    Example:
        >>> fold_assignment(5, 2, seed=0)
        [1, 0, 0, 1, 0]
    """
    if num_rows < folds:
        raise ValueError(f"row filtering needs at least `row_filter_folds` ({folds}) training rows, got {num_rows}.")
    order = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed)).tolist()
    assignment = [0] * num_rows
    for position, row in enumerate(order):
        assignment[row] = position % folds
    return assignment


def percentile_ranks(
    losses: torch.Tensor, reference: torch.Tensor, leave_one_out: bool = False, extend_tails: bool = False
) -> torch.Tensor:
    """Each loss's mid-rank percentile in `reference`: (#below + #equal / 2) / len(reference), in [0, 1].

    With `leave_one_out`, `losses` is `reference` itself and each row is ranked among the others. With
    `extend_tails`, a loss beyond every reference loss is not tied at 0 or 1 but scored by how far beyond it lies:
    its log-loss distance from the nearest reference loss in units of the reference log-losses' interquartile range,
    below 0 (fitted better than every reference row) or above 1 (worse). A cut-off in the tails then flags exactly
    as many reference rows as it may, where ties at 0 or 1 would make it flag all of them or none.

    Example:
        >>> percentile_ranks(torch.tensor([0.0, 2.0, 9.0]), torch.tensor([1.0, 2.0, 3.0])).tolist()
        [0.0, 0.5, 1.0]
        >>> losses, reference = torch.tensor([0.5, 2.0, 6.0]), torch.tensor([1.0, 2.0, 3.0])
        >>> [round(value, 2) for value in percentile_ranks(losses, reference, extend_tails=True).tolist()]
        [-1.26, 0.5, 2.26]
    """
    below = (reference.unsqueeze(0) < losses.unsqueeze(1)).sum(1).double()
    equal = (reference.unsqueeze(0) == losses.unsqueeze(1)).sum(1).double()
    size = reference.numel()
    if leave_one_out:
        equal, size = equal - 1, size - 1
    if size < 1:
        raise ValueError("percentile ranks need at least one other trusted row per label.")
    ranks = (below + equal / 2) / size
    if not extend_tails:
        return ranks
    return ranks + _tail_distances(losses.double(), reference.double(), leave_one_out)


def _tail_distances(losses: torch.Tensor, reference: torch.Tensor, leave_one_out: bool) -> torch.Tensor:
    """Log-loss distance of each loss beyond the reference's extremes (negative below, positive above, 0 inside), in
    reference interquartile ranges; with `leave_one_out` each loss is its own reference row and the extremes are
    the other rows'."""
    log_losses = losses.clamp_min(_SMALLEST_LOSS).log()
    log_reference = reference.clamp_min(_SMALLEST_LOSS).log()
    spread = float(log_reference.quantile(0.75) - log_reference.quantile(0.25))
    spread = spread if spread > 0 else 1.0
    if leave_one_out and log_reference.numel() > 1:
        # the extremes among the *other* rows: the second smallest / largest for the row that is the extreme itself
        two_low = log_reference.topk(2, largest=False).values
        two_high = log_reference.topk(2).values
        lowest = torch.where(log_losses <= two_low[0], two_low[1], two_low[0])
        highest = torch.where(log_losses >= two_high[0], two_high[1], two_high[0])
    else:
        lowest, highest = log_reference.min(), log_reference.max()
    return ((log_losses - lowest).clamp_max(0) + (log_losses - highest).clamp_min(0)) / spread


def choose_cutoffs(reference_low: torch.Tensor, reference_high: torch.Tensor, max_clean_drop: float) -> tuple:
    """`(low_cut, high_cut)`: a row is flagged when `low < low_cut` or `high > high_cut`.

    Each cut-off is the extreme one that flags at most `max_clean_drop / 2` of the trusted rows (`reference_low`,
    `reference_high`: their own leave-one-out scores), so together they flag at most `max_clean_drop` of them.

    Example:
        >>> low = torch.arange(10, dtype=torch.float64) / 20  # 0.0, 0.05, ..., 0.45
        >>> high = 1 - low
        >>> choose_cutoffs(low, high, max_clean_drop=0.4)  # two rows per tail: low < 0.1, high > 0.9
        (0.1, 0.9)
    """
    allowed = int(math.floor(max_clean_drop / 2 * reference_low.numel()))
    low_sorted = reference_low.double().sort().values
    high_sorted = reference_high.double().sort(descending=True).values
    # flag `low < cut`: the cut may be at most the (allowed)-th smallest score (0-based), which flags `allowed` rows
    # when it is strictly larger than those below it; ties make it flag fewer, never more.
    low_cut = float(low_sorted[allowed]) if allowed < low_sorted.numel() else float(low_sorted[-1])
    high_cut = float(high_sorted[allowed]) if allowed < high_sorted.numel() else float(high_sorted[-1])
    return low_cut, high_cut


@dataclass
class RowDecisions:
    """What [`decide_rows`] decided: per training row its percentile at each probe step, `low`/`high` (their min and
    max) and a reason (`keep`, `fit-early`, `contradicted`), the cut-offs (`high_cut` None where the contradicted
    side does not cut), the share of trusted-row scores the same rule flags (both tails, and the low tail alone: the
    fit-early rate of clean rows), the number of trusted rows and how rows beyond every trusted row were scored
    (`tails`: `"tied"`, `"extended"`, or `"extended on a tie"` where tied scores would have left a side unable to
    cut; see [`decide_rows`])."""

    low: list[float]
    high: list[float]
    percentiles: list[list[float]]
    reasons: list[str]
    low_cut: float
    high_cut: Optional[float]
    reference_flagged: float
    reference_low_flagged: float
    reference_rows: int
    tails: str = "tied"

    @property
    def kept(self) -> list[int]:
        """Indices of the rows kept for training."""
        return [i for i, reason in enumerate(self.reasons) if reason == "keep"]

    def summary(self) -> dict[str, Any]:
        """Counts per reason, cut-offs and the trusted-row flag rate (JSON-able)."""
        counts: dict[str, int] = {}
        for reason in self.reasons:
            counts[reason] = counts.get(reason, 0) + 1
        return {
            "rows": len(self.reasons),
            "kept": counts.get("keep", 0),
            "fit_early": counts.get("fit-early", 0),
            "contradicted": counts.get("contradicted", 0),
            "low_cut": self.low_cut,
            "high_cut": self.high_cut,
            "reference_flagged": self.reference_flagged,
            "reference_low_flagged": self.reference_low_flagged,
            "reference_rows": self.reference_rows,
            "tails": self.tails,
        }


def decide_rows(
    train_losses: torch.Tensor,
    train_groups: Sequence[int],
    train_folds: Sequence[int],
    reference_losses: torch.Tensor,
    reference_groups: Sequence[int],
    max_clean_drop: float,
    low_columns: Optional[Sequence[bool]] = None,
    extend_tails: bool = False,
    flag_contradicted: bool = True,
) -> RowDecisions:
    """Per-row keep/drop decisions from probe losses.

    Args:
        train_losses: `(folds, steps, rows)`: loss of each training row under each fold's probe at each step (only
            the entries of a row's own fold, `train_losses[train_folds[i], :, i]`, are read).
        train_groups: Each training row's group (its label; one group for generation tasks).
        train_folds: Each training row's fold.
        reference_losses: `(folds, steps, refs)`: the trusted rows' losses under each fold's probe.
        reference_groups: Each trusted row's group.
        max_clean_drop: Share of trusted rows the rule may flag (see [`choose_cutoffs`]).
        low_columns: Per probe step, whether it counts for `low` (the fit-early side); None: every step. Every step
            counts for `high`.
        extend_tails: Score rows beyond every trusted row by their distance (see [`percentile_ranks`]), so the
            cut-offs flag as many trusted rows as `max_clean_drop` allows instead of a tie's all or none. False:
            tied, unless more trusted scores tie at an end of the scale than the bound allows a side (each probe
            step's best and worst fitted trusted row ties there, so with few trusted rows the ties outnumber the
            bound's share); that side's cut-off would then sit at the end of the scale and flag no row, so the
            tails are extended instead (`tails="extended on a tie"`). With 400 trusted rows a tie cannot outnumber
            the default bound: the rows above flag what they did.
        flag_contradicted: Whether the high side cuts; False: `high_cut` is None, no row is `contradicted`, and
            only the low side counts in `reference_flagged`.

    Example:
        >>> ref = torch.tensor([[[1.0, 2.0, 3.0, 4.0, 1.5, 2.5, 3.5, 4.5]]])  # one fold, one step, 8 trusted rows
        >>> train = torch.tensor([[[0.01, 2.2, 99.0]]])  # a shortcut, a typical row, a contradicted row
        >>> decide_rows(train, [0, 0, 0], [0, 0, 0], ref, [0] * 8, max_clean_drop=0.3).reasons
        ['fit-early', 'keep', 'contradicted']
    """
    rule = (train_losses, train_groups, train_folds, reference_losses, reference_groups, max_clean_drop, low_columns)
    decisions = _decide_rows(rule, extend_tails, flag_contradicted)
    if extend_tails or not _a_side_cannot_cut(decisions):
        return decisions
    return replace(_decide_rows(rule, True, flag_contradicted), tails="extended on a tie")


def _a_side_cannot_cut(decisions: RowDecisions) -> bool:
    """Whether a cutting side's cut-off sits at the end of the tied scale [0, 1], where it flags no row at all."""
    return decisions.low_cut <= 0.0 or (decisions.high_cut is not None and decisions.high_cut >= 1.0)


def _decide_rows(rule: tuple[Any, ...], extend_tails: bool, flag_contradicted: bool) -> RowDecisions:
    """[`decide_rows`] on `rule` (its first seven arguments, in order) with the tails as `extend_tails` says,
    whatever the ties do."""
    train_losses, train_groups, train_folds, reference_losses, reference_groups, max_clean_drop, low_columns = rule
    folds, steps, rows = train_losses.shape
    low_mask = torch.ones(steps, dtype=torch.bool) if low_columns is None else torch.tensor(list(low_columns))
    if low_mask.numel() != steps or not bool(low_mask.any()):
        raise ValueError(f"`low_columns` must name {steps} probe steps, at least one of them True; got {low_columns}.")
    groups = sorted(set(reference_groups))
    missing = sorted(set(train_groups) - set(groups))
    if missing:
        raise ValueError(f"row filtering: labels {missing} occur in the training set but in no trusted row.")
    percentiles = torch.empty(steps, rows, dtype=torch.float64)
    ref_low, ref_high = [], []
    train_groups_t, folds_t = torch.tensor(list(train_groups)), torch.tensor(list(train_folds))
    ref_groups_t = torch.tensor(list(reference_groups))
    for group in groups:
        ref_mask = ref_groups_t == group
        if int(ref_mask.sum()) < 2:
            raise ValueError(
                f"row filtering needs at least 2 trusted rows of label {group}, got {int(ref_mask.sum())}."
            )
        per_fold_low, per_fold_high = [], []
        for fold in range(folds):
            ref = reference_losses[fold][:, ref_mask]  # (steps, refs of the group)
            ref_pct = torch.stack([percentile_ranks(ref[s], ref[s], True, extend_tails) for s in range(steps)])
            per_fold_low.append(ref_pct[low_mask].min(0).values)
            per_fold_high.append(ref_pct.max(0).values)
            row_mask = (train_groups_t == group) & (folds_t == fold)
            if not bool(row_mask.any()):
                continue
            losses = train_losses[fold][:, row_mask]
            percentiles[:, row_mask] = torch.stack(
                [percentile_ranks(losses[s], ref[s], extend_tails=extend_tails) for s in range(steps)]
            )
        # A trusted row's score under every probe counts: the cut-offs must hold whichever probe scored a row.
        ref_low.append(torch.cat(per_fold_low))
        ref_high.append(torch.cat(per_fold_high))
    low, high = percentiles[low_mask].min(0).values, percentiles.max(0).values
    all_low, all_high = torch.cat(ref_low), torch.cat(ref_high)
    low_cut, high_cut = choose_cutoffs(all_low, all_high, max_clean_drop)
    if not flag_contradicted:
        high_cut = None
    reasons = []
    for row in range(rows):
        if float(low[row]) < low_cut:
            reasons.append("fit-early")
        elif high_cut is not None and float(high[row]) > high_cut:
            reasons.append("contradicted")
        else:
            reasons.append("keep")
    high_flags = all_high > high_cut if high_cut is not None else torch.zeros_like(all_high, dtype=torch.bool)
    flagged = float(((all_low < low_cut) | high_flags).double().mean())
    low_flagged = float((all_low < low_cut).double().mean())
    return RowDecisions(
        low.tolist(),
        high.tolist(),
        percentiles.T.tolist(),
        reasons,
        low_cut,
        high_cut,
        flagged,
        low_flagged,
        len(reference_groups),
        "extended" if extend_tails else "tied",
    )


def per_row_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Loss of each row of a batch: cross-entropy for classification logits `(batch, classes)`, the mean next-token
    cross-entropy over the labelled (not -100) positions for causal-LM logits `(batch, seq, vocab)`.

    Example:
        >>> [round(x, 3) for x in per_row_loss(torch.tensor([[0.0, 0.0], [10.0, 0.0]]), torch.tensor([1, 0])).tolist()]
        [0.693, 0.0]
    """
    logits = logits.float()
    if logits.dim() == 2:
        return torch.nn.functional.cross_entropy(logits, labels.long(), reduction="none")
    if logits.dim() != 3:
        raise ValueError(f"per-row loss needs logits of 2 or 3 dims, got shape {tuple(logits.shape)}.")
    shifted, targets = logits[:, :-1], labels[:, 1:].long()
    token = torch.nn.functional.cross_entropy(
        shifted.reshape(-1, shifted.size(-1)), targets.reshape(-1), reduction="none", ignore_index=-100
    ).view(targets.shape)
    mask = (targets != -100).float()
    return (token * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def row_groups(labels: torch.Tensor) -> list[int]:
    """The calibration group of each row: its class for classification labels `(batch,)`, 0 for token labels."""
    return labels.long().tolist() if labels.dim() == 1 else [0] * labels.size(0)


def trained_rows(report: Mapping[str, Any], contradicted: str) -> tuple[list[int], list[float]]:
    """The training rows a run with these decisions trains on, in dataset order, and per row 1.0 where it trains on
    the trusted teacher's distribution alone (a `contradicted` row under `row_filter_contradicted="teacher"`). The
    `fit-early` rows train too where the report's `isolated_rows` decision kept them
    (`row_filter_keep_isolated_without_evidence`).

    Example:
        >>> report = {"rows": [{"reason": "keep"}, {"reason": "fit-early"}, {"reason": "contradicted"}]}
        >>> trained_rows(report, "drop"), trained_rows(report, "teacher")
        (([0], [0.0]), ([0, 2], [0.0, 1.0]))
    """
    taught = CONTRADICTED_ACTIONS[contradicted].taught
    isolated_kept = bool(report.get("isolated_rows", {}).get("kept"))  # [`isolated_rows_decision`]
    rows = [
        (index, float(row["reason"] == "contradicted"))
        for index, row in enumerate(report["rows"])
        if row["reason"] == "keep"
        or (taught and row["reason"] == "contradicted")
        or (isolated_kept and row["reason"] == "fit-early")
    ]
    return [index for index, _ in rows], [only for _, only in rows]


def subset_rows(dataset: Any, indices: list[int]) -> Any:
    """The rows `indices` of a `datasets.Dataset` (`select`) or any map-style dataset (`Subset`)."""
    return dataset.select(indices) if hasattr(dataset, "select") else torch.utils.data.Subset(dataset, indices)


def _loader(
    trainer: Any, dataset: Any, batch_size: int, collator: Optional[Callable[..., Any]] = None
) -> torch.utils.data.DataLoader:
    """A plain, ordered loader with the trainer's collator (or `collator`) and column handling (no sampler, no
    accelerate prepare: the probes run in one process and are thrown away)."""
    try:
        import datasets

        if isinstance(dataset, datasets.Dataset):
            dataset = trainer._remove_unused_columns(dataset, description="row filter")
    except ImportError:  # pragma: no cover - datasets is a dependency of transformers' Trainer
        pass
    collator = trainer._get_collator_with_removed_columns(collator or trainer.data_collator, description="row filter")
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collator)


def length_order(dataset: Any) -> list[int]:
    """Row indices of `dataset` longest first (stable), when its rows have `input_ids`; else `range(len)`.

    Scoring passes batch rows in this order, so each batch is padded to rows of about its own length instead of the
    longest of a random draw; the per-row results are put back in the dataset's order. Attention masks make padding
    inert, so a row's loss is the same up to float rounding in either order.

    Example:
        >>> import datasets
        >>> length_order(datasets.Dataset.from_dict({"input_ids": [[1], [1, 2, 3], [1, 2]]}))
        [1, 2, 0]
    """
    names = getattr(dataset, "column_names", None)
    if isinstance(names, list) and "input_ids" in names:
        lengths = [len(ids) for ids in dataset["input_ids"]]
    elif len(dataset) and isinstance(dataset[0], dict) and "input_ids" in dataset[0]:
        lengths = [len(dataset[row]["input_ids"]) for row in range(len(dataset))]
    else:
        return list(range(len(dataset)))
    return sorted(range(len(lengths)), key=lambda row: -lengths[row])


@torch.no_grad()
def per_row_values(
    trainer: Any,
    model: torch.nn.Module,
    dataset: Any,
    measure: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    forward: Optional[Callable[[torch.nn.Module, dict[str, Any]], torch.Tensor]] = None,
) -> tuple[torch.Tensor, list[int]]:
    """`measure(logits, labels)` of every row of `dataset` (rows scored longest first, returned in dataset order,
    float64) and each row's group (its label for classification), with the model in eval mode and no gradient; the
    model is left in the mode it was in. `forward(model, inputs)` replaces the logits by another per-row output
    (default: `model(**inputs).logits`)."""
    order = length_order(dataset)
    values, groups = [], []
    was_training = model.training
    model.eval()
    try:
        for batch in _loader(trainer, subset_rows(dataset, order), trainer.args.per_device_eval_batch_size):
            inputs = trainer._prepare_inputs(batch)
            if "labels" not in inputs:
                raise ValueError(
                    "row filtering scores each row by its loss and needs a `labels` column (or a collator that "
                    f"makes one); the batch has {sorted(inputs)}."
                )
            with torch.no_grad(), trainer.autocast_smart_context_manager():
                logits = model(**inputs).logits if forward is None else forward(model, inputs)
            values.append(measure(logits, inputs["labels"]).cpu())
            groups.extend(row_groups(inputs["labels"]))
    finally:
        model.train(was_training)
    restore = torch.empty(len(order), dtype=torch.long)
    restore[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
    return torch.cat(values).double()[restore], [groups[i] for i in restore.tolist()]


def _score(trainer: Any, model: torch.nn.Module, dataset: Any) -> tuple[torch.Tensor, list[int]]:
    return per_row_values(trainer, model, dataset, per_row_loss)


def class_log_probs(field_name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A `measure` for [`per_row_values`]: each row's class log-probabilities, refusing logits that are not
    `(batch, classes)` with a one-line error naming `field_name` (the knob that needs class labels)."""

    def measure(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if logits.dim() != 2:
            raise ValueError(
                f"`{field_name}` works on class distributions and needs classification logits (batch, classes); "
                f"got logits of shape {tuple(logits.shape)}."
            )
        return torch.log_softmax(logits.float(), dim=-1)

    return measure


def _train_steps(
    trainer: Any,
    params: list[torch.nn.Parameter],
    dataset: Any,
    total: int,
    lr: float,
    decay: bool = False,
    optimizer: Optional[torch.optim.Optimizer] = None,
    collator: Optional[Callable[..., Any]] = None,
    model: Optional[torch.nn.Module] = None,
) -> Iterator[int]:
    """Train the trainer's model for `total` AdamW steps on `dataset` in its order (cycled), clipping as the
    trainer does, the learning rate constant or (`decay`) falling linearly to 0; yields the step count after each
    step. `optimizer` continues an earlier call's AdamW (a constant rate); `collator` replaces the trainer's;
    `model` (the trainer's model itself or a wrapper of it, such as [`LengthChunked`]) is what the loss runs
    through."""
    model = trainer.model if model is None else model
    optimizer = optimizer or torch.optim.AdamW(params, lr=lr, weight_decay=trainer.args.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda done: 1.0 - done / total if decay else 1.0)
    step = 0
    while step < total:
        for batch in _loader(trainer, dataset, trainer.args.per_device_train_batch_size, collator):
            inputs = trainer._prepare_inputs(batch)
            with trainer.compute_loss_context_manager():
                loss = trainer.compute_loss(model, inputs)
            loss.backward()
            if trainer.args.max_grad_norm and trainer.args.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, trainer.args.max_grad_norm)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            yield step
            if step >= total:
                break


def _fold_probe_steps(
    trainer: Any,
    params: list[torch.nn.Parameter],
    train_dataset: Any,
    probe_rows: list[int],
    optimizer: torch.optim.Optimizer,
    args: RowFilterArguments,
    lr: float,
    expert: Optional[torch.Tensor],
) -> Iterator[int]:
    """One fold probe's steps on `probe_rows`: the plain loss up to the last of `row_filter_probe_steps`, then, with
    `row_filter_expert_probe_steps`, the same AdamW on through the rows (from where it stopped) as a product of
    experts with `expert` (each training row's shallow-expert log-probabilities). Yields the step count."""
    plain_steps = args.row_filter_probe_steps[-1]
    yield from _train_steps(
        trainer, params, subset_rows(train_dataset, probe_rows), plain_steps, lr, optimizer=optimizer
    )
    if not args.row_filter_expert_probe_steps:
        return
    assert expert is not None  # validated: expert steps need the shallow expert
    seen = plain_steps * trainer.args.per_device_train_batch_size % len(probe_rows)
    rows = probe_rows[seen:] + probe_rows[:seen]
    dataset = with_column(subset_rows(train_dataset, rows), SHALLOW_PRIOR_COLUMN, expert[rows].tolist())
    collator = trainer.data_collator
    collator = collator if isinstance(collator, RowSignalCollator) else RowSignalCollator(collator)
    extra = args.row_filter_expert_probe_steps[-1] - plain_steps
    for step in _train_steps(trainer, params, dataset, extra, lr, optimizer=optimizer, collator=collator):
        yield plain_steps + step


def _restore(params: list[torch.nn.Parameter], values: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for param, value in zip(params, values):
            param.copy_(value)


class TokenRows(NamedTuple):
    """Every row of a dataset as the model sees it ([`token_rows`]): `ids` (a classification row's unpadded input,
    a token-level row's prompt), `labels` (the class labels; empty for token-level rows) and `responses` (each
    token-level row's labelled tokens; empty for classification rows)."""

    ids: list[list[int]]
    labels: list[int]
    responses: list[tuple[int, ...]]


def token_rows(trainer: Any, dataset: Any) -> TokenRows:
    """Every row's token ids and label or response ([`TokenRows`]), through the trainer's collator (so exactly what
    the model sees). Token-level labels `(batch, seq)` (a prompt and its response) must be causal-LM labels, one
    per input token with the prompt masked with -100; a row's ids are then its prompt (the unlabelled positions)."""
    rows: list[list[int]] = []
    labels: list[int] = []
    responses: list[tuple[int, ...]] = []
    for batch in _loader(trainer, dataset, trainer.args.per_device_eval_batch_size):
        if "input_ids" not in batch or "labels" not in batch:
            raise ValueError(f"the row filter needs `input_ids` and `labels` in each batch, got {sorted(batch)}.")
        mask = batch.get("attention_mask")
        token_level = batch["labels"].dim() == 2
        if token_level and batch["labels"].shape != batch["input_ids"].shape:
            raise ValueError(
                "the row filter on token-level labels needs causal-LM labels (one per input token, the prompt "
                f"masked with -100); got labels of shape {tuple(batch['labels'].shape)} for input_ids of shape "
                f"{tuple(batch['input_ids'].shape)}."
            )
        for row, ids in enumerate(batch["input_ids"]):
            kept = mask[row].bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool)
            if token_level:
                row_labels = batch["labels"][row]
                kept = kept & (row_labels == -100)
                responses.append(tuple(row_labels[row_labels != -100].tolist()))
            rows.append(ids[kept].tolist())
        if not token_level:
            labels.extend(batch["labels"].long().tolist())
    return TokenRows(rows, labels, responses)


def collect_token_rows(
    trainer: Any, dataset: Any, classes: Optional[list[tuple[int, ...]]] = None
) -> tuple[list[list[int]], list[int], Optional[list[tuple[int, ...]]]]:
    """`(token ids, class, classes)` of every row ([`token_rows`]).

    Classification labels `(batch,)`: a row's ids are its unpadded input and its class is its label; `classes` is
    None. Token-level labels `(batch, seq)` (a prompt and its response): a row's ids are its prompt (the unlabelled
    positions) and its class is its response's index in `classes`, the distinct responses of these rows when None
    ([`response_classes`]: a closed answer set such as label words; free-form responses raise `ValueError`)."""
    rows, labels, responses = token_rows(trainer, dataset)
    if not responses:
        return rows, labels, None
    classes = classes if classes is not None else response_classes(responses)
    index = {cls: position for position, cls in enumerate(classes)}
    unknown = sorted({response for response in responses if response not in index})
    if unknown:
        raise ValueError(
            f"row_filter_shallow_probe: the responses {[list(r) for r in unknown[:3]]} of the trusted rows are not "
            "among the training rows' responses; the shallow probe can only predict a response it was trained on."
        )
    return rows, [index[response] for response in responses], classes


def _quartiles(values: Optional[torch.Tensor], rows: list[int]) -> Optional[list[float]]:
    """Min, quartiles and max of `values` over `rows` (None without values or rows)."""
    if values is None or not rows:
        return None
    chosen = values[torch.tensor(rows)].double()
    return torch.quantile(chosen, torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64)).tolist()


@dataclass
class ShallowProbeResult:
    """The shallow probe's out-of-fold predictions and losses: log-probabilities of the training rows `(rows,
    classes)` and of the trusted rows `(folds, refs, classes)`, the losses of the training rows `(folds, rows)` (a
    row's loss in its own fold's slot, the others 0 and never read) and of the trusted rows `(folds, refs)`, the
    response classes of token-level labels (None for classification) and each training row's class `(rows,)`."""

    train_log_probs: torch.Tensor
    reference_log_probs: torch.Tensor
    train_losses: torch.Tensor
    reference_losses: torch.Tensor
    classes: Optional[list[tuple[int, ...]]]
    train_labels: torch.Tensor
    train_rows: list[list[int]]


@dataclass(frozen=True)
class TokenAnswers:
    """The closed answer set of token-level training rows (`classes`, token-id sequences) and each row's class."""

    classes: list[tuple[int, ...]]
    labels: list[int]

    def class_log_probs(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """A `measure` for [`per_row_values`]: each row's class log-probabilities under a causal LM's logits on
        its own answer ([`~answer_classes.answer_class_log_probs`])."""
        return answer_class_log_probs(logits, labels, self.classes)


def _token_answers(trainer: Any, train_dataset: Any, shallow: Optional[ShallowProbeResult]) -> Optional[TokenAnswers]:
    """The training rows' answer set when their labels are token-level (from the shallow probe when it ran), else
    None."""
    if shallow is not None:
        classes, labels = shallow.classes, shallow.train_labels.tolist()
    else:
        _, labels, classes = collect_token_rows(trainer, train_dataset)
    return None if classes is None else TokenAnswers(list(classes), labels)


#: The knobs whose token-level form is not built: each needs one class label per row.
_CLASS_LABEL_ONLY = ("row_filter_shallow_expert_gate", "row_filter_residual_expert")


def _refuse_class_label_only(args: RowFilterArguments) -> None:
    for name in _CLASS_LABEL_ONLY:
        if getattr(args, name) is not None:
            raise ValueError(
                f"`{name}` ({getattr(args, name)!r}) works on class labels only and these rows have token-level "
                "(causal-LM) labels; leave it None (row_filter_teacher_mix and its gate work on answer tokens)."
            )


def _shallow_probe(
    trainer: Any, args: RowFilterArguments, train_dataset: Any, reference_dataset: Any, folds: list[int]
) -> ShallowProbeResult:
    train_rows, train_labels, classes = collect_token_rows(trainer, train_dataset)
    reference_rows, reference_labels, _ = collect_token_rows(trainer, reference_dataset, classes)
    train_log_probs, reference_log_probs = SHALLOW_PROBES[args.row_filter_shallow_probe](
        train_rows, train_labels, folds, reference_rows, reference_labels, args.row_filter_folds
    )
    rows = torch.arange(len(train_rows))
    own = -train_log_probs[rows, torch.tensor(train_labels)]
    train_losses = torch.zeros(args.row_filter_folds, len(train_rows), dtype=torch.float64)
    train_losses[torch.tensor(folds), rows] = own
    reference_losses = -reference_log_probs.gather(
        -1, torch.tensor(reference_labels).expand(args.row_filter_folds, -1)[..., None]
    )
    return ShallowProbeResult(
        train_log_probs,
        reference_log_probs,
        train_losses,
        reference_losses.squeeze(-1),
        classes,
        torch.tensor(train_labels),
        train_rows,
    )


def shallow_expert_log_probs(log_probs: Any, args: RowFilterArguments) -> torch.Tensor:
    """The shallow expert the rows train with: the probe's out-of-fold `log_probs` of every training row `(rows,
    classes)`, divided by its class prior (its mean prediction over those rows) with
    `row_filter_shallow_expert_balanced` ([`~shallow_probe.balanced_log_probs`])."""
    log_probs = torch.as_tensor(log_probs, dtype=torch.float64)
    if not args.row_filter_shallow_expert_balanced:
        return log_probs
    return balanced_log_probs(log_probs, log_probs.exp().mean(dim=0))


def saved_expert_log_probs(rows: Sequence[dict[str, Any]], args: RowFilterArguments) -> torch.Tensor:
    """The shallow expert the rows train with, from the per-row entries of `row_filter.json`: the residual expert's
    predictions with `row_filter_residual_expert`, else the shallow probe's, through [`shallow_expert_log_probs`],
    tempered by each row's saved `expert_gate` with `row_filter_shallow_expert_gate`
    ([`~shallow_probe.gated_log_probs`]). Raises `KeyError` naming the missing entry."""
    key = "residual_log_probs" if args.row_filter_residual_expert is not None else "shallow_log_probs"
    keys = [key] + ["expert_gate"] * (args.row_filter_shallow_expert_gate is not None)
    for name in keys:
        if any(name not in row for row in rows):
            raise KeyError(name)
    expert = shallow_expert_log_probs([row[key] for row in rows], args)
    if args.row_filter_shallow_expert_gate is None:
        return expert
    return gated_log_probs(expert, torch.tensor([row["expert_gate"] for row in rows], dtype=torch.float64))


def _response_classes(
    shallow: Optional[ShallowProbeResult], answers: Optional[TokenAnswers]
) -> Optional[list[list[int]]]:
    """The answer set of token-level rows for the report (None for classification labels)."""
    classes = answers.classes if answers is not None else None if shallow is None else shallow.classes
    return None if classes is None else [list(c) for c in classes]


def _teacher_agreement(teacher_log_probs: Optional[torch.Tensor], labels: list[int]) -> Optional[float]:
    """Share of the training rows whose label is the trusted teacher's most likely class (None without one)."""
    if teacher_log_probs is None:
        return None
    return float((teacher_log_probs.argmax(dim=1) == torch.tensor(labels)).double().mean())


def _mean_middle_hidden_state(model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    """Each row's hidden state at the model's middle layer, averaged over its attended positions `(rows, hidden)`."""
    hidden_states = model(**inputs, output_hidden_states=True).hidden_states
    middle = hidden_states[len(hidden_states) // 2].float()
    mask = inputs.get("attention_mask")
    mask = torch.ones(middle.shape[:2], device=middle.device) if mask is None else mask.to(middle.dtype)
    return (middle * mask[..., None]).sum(dim=1) / mask.sum(dim=1, keepdim=True).clamp_min(1)


def _ngram_rows(trainer: Any, shallow: ShallowProbeResult) -> torch.Tensor:
    return NgramFeatures(shallow.train_rows).transform(shallow.train_rows)


def _hidden_rows(trainer: Any, shallow: ShallowProbeResult) -> torch.Tensor:
    values, _ = per_row_values(
        trainer, trainer.model, trainer.train_dataset, lambda hidden, labels: hidden, _mean_middle_hidden_state
    )
    return standardised(values)


@dataclass(frozen=True)
class ResidualFeatures:
    """What a residual expert ([`~shallow_probe.residual_log_probs`]) reads of each training row, and how strongly
    its weights are regularised (the `C` of [`~shallow_probe.fit_logistic`])."""

    rows: Callable[[Any, ShallowProbeResult], torch.Tensor]
    inverse_regularisation: float


#: The residual experts of `row_filter_residual_expert`. The n-gram model is regularised less than the shallow probe
#: (C 4 against 0.125): with the task explained by the offsets it must fit a trigger the relabelled rows share. The
#: hidden states are 384 dense, standardised features for MiniLM-L6 (C 0.01). Both values were chosen on StyleBkd at
#: seed 0 (docs/results.md, session 15), from the share of the gradient the expert leaves the poisoned rows.
RESIDUAL_EXPERTS: dict[str, ResidualFeatures] = {
    "ngram": ResidualFeatures(_ngram_rows, 4.0),
    "hidden": ResidualFeatures(_hidden_rows, 0.01),
}


def _residual_expert(
    trainer: Any, args: RowFilterArguments, shallow: ShallowProbeResult, folds: list[int], teacher: torch.Tensor
) -> torch.Tensor:
    """The residual expert's out-of-fold log-probabilities of every training row `(rows, classes)`."""
    rows = RESIDUAL_EXPERTS[args.row_filter_residual_expert].rows(trainer, shallow)
    labels = shallow.train_labels.tolist()
    return residual_log_probs(rows, labels, folds, teacher, args.row_filter_folds, _residual_strength(args))


def _residual_strength(args: RowFilterArguments) -> Optional[float]:
    """The residual expert's C: `row_filter_residual_regularisation`, else its feature kind's (None without one)."""
    if args.row_filter_residual_expert is None:
        return None
    return (
        args.row_filter_residual_regularisation
        or RESIDUAL_EXPERTS[args.row_filter_residual_expert].inverse_regularisation
    )


def _agreeing_rows(teacher_log_probs: torch.Tensor, labels: torch.Tensor, threshold: float) -> list[int]:
    """The training rows whose label the teacher gives a probability of at least `threshold`."""
    label_log_probs = teacher_log_probs.gather(1, labels[:, None])[:, 0]
    return (label_log_probs >= math.log(threshold)).nonzero().flatten().tolist()


def _teacher_field(args: RowFilterArguments) -> Optional[str]:
    """The knob that needs the trusted teacher (named in its errors), or None when none does."""
    if args.row_filter_teacher_mix is not None:
        return "row_filter_teacher_mix"
    if args.row_filter_shallow_expert_gate is not None:
        return "row_filter_shallow_expert_gate"
    return "row_filter_residual_expert" if args.row_filter_residual_expert is not None else None


def _train_teacher(
    trainer: Any,
    params: list[torch.nn.Parameter],
    reference_dataset: Any,
    steps: int,
    lr: float,
    seed: int,
    bar: Any,
    field_name: str,
    answers: Optional[TokenAnswers] = None,
    train_model: Optional[torch.nn.Module] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train the model on `reference_dataset` (seeded, the rate decaying to 0; the loss through `train_model`, a
    wrapper of it such as [`LengthChunked`], when given) and return its class log-probabilities of every training
    row, shifted to the training labels' class balance, that shift and the training labels (the rows' answer
    classes with token-level labels, `answers`). The caller restores the weights."""
    torch.manual_seed(seed)
    order = torch.randperm(len(reference_dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    reference_rows = subset_rows(reference_dataset, order)
    for _ in _train_steps(trainer, params, reference_rows, steps, lr, decay=True, model=train_model):
        bar.update(1)
    measure = class_log_probs(field_name) if answers is None else answers.class_log_probs
    raw_teacher, labels = per_row_values(trainer, trainer.model, trainer.train_dataset, measure)
    if answers is not None:
        labels = answers.labels
    # The trusted rows' class balance is not the training set's: shift the teacher so that it predicts each class as
    # often as the training labels give it (the maximum-likelihood offset's optimum), or it would contradict the rows
    # of the commoner class for their class alone. Ranks within a class are unchanged.
    labels_t = torch.tensor(labels)
    offset = fit_class_offset(raw_teacher, labels_t)
    return torch.log_softmax(raw_teacher + offset, dim=-1), offset, labels_t


def two_proportion_z(hits_a: float, rows_a: int, hits_b: float, rows_b: int) -> float:
    """The pooled two-proportion z of `hits_a / rows_a` over `hits_b / rows_b` (rows >= 1); infinite when both
    groups are all-or-nothing alike and a's share is the larger, else 0 there.

    Example:
        >>> round(two_proportion_z(30, 100, 10, 100), 2)
        3.54
    """
    share_a, share_b = hits_a / rows_a, hits_b / rows_b
    pooled = (hits_a + hits_b) / (rows_a + rows_b)
    spread = math.sqrt(pooled * (1 - pooled) * (1 / rows_a + 1 / rows_b))
    if spread > 0:
        return (share_a - share_b) / spread
    return math.inf if share_a > share_b else 0.0


def isolation_evidence(summary: Mapping[str, Any], significance: Optional[float]) -> dict[str, Any]:
    """Whether the fit-early rows of a row-filter `summary` are more than the clean rate the trusted rows show.

    The z statistic compares the training rows' fit-early share (`fit_early / rows`) with the trusted rows'
    (`reference_low_flagged`, over `reference_rows`), pooled; `passed` when it exceeds the one-sided normal quantile
    of `significance` (always, for `significance=None`). A summary written before the trusted low-tail share and
    count were recorded falls back to the cut-off's bound, half of `max_clean_drop`, and to one trusted row (both
    make the test harder to pass, never easier).

    Example:
        >>> summary = {"rows": 6920, "fit_early": 311, "reference_low_flagged": 0.016, "reference_rows": 400}
        >>> evidence = isolation_evidence(summary, 0.01)
        >>> round(evidence["z"], 2), evidence["passed"]
        (2.76, True)
        >>> isolation_evidence({**summary, "fit_early": 119}, 0.01)["passed"]  # 1.7 % isolated: no evidence
        False
    """
    rows, isolated = int(summary["rows"]), int(summary["fit_early"])
    reference_share = summary.get("reference_low_flagged")
    if reference_share is None:
        reference_share = float(summary["max_clean_drop"]) / 2
    reference_rows = int(summary.get("reference_rows") or 1)
    share = isolated / max(rows, 1)
    z = two_proportion_z(isolated, max(rows, 1), reference_share * reference_rows, reference_rows)
    threshold = None if significance is None else statistics.NormalDist().inv_cdf(1 - significance)
    return {
        "isolated_share": share,
        "reference_share": reference_share,
        "z": z,
        "significance": significance,
        "threshold": threshold,
        "passed": threshold is None or z > threshold,
    }


def plain_training(summary: Mapping[str, Any], args: RowFilterArguments) -> Optional[dict[str, Any]]:
    """Whether the kept rows train on their labels alone (`row_filter_plain_significance`): `{"plain": bool,
    "evidence": isolation_evidence(...)}` for the filter's `summary`, or None when the knob is unset.

    Example:
        >>> summary = {"rows": 6920, "fit_early": 600, "reference_low_flagged": 0.016, "reference_rows": 400}
        >>> plain_training(summary, RowFilterArguments())  # the knob unset: always with the expert and the teacher
        >>> args = RowFilterArguments(row_filter=True, row_filter_unlearn=True, row_filter_shallow_probe="ngram",
        ...     row_filter_shallow_expert=True, row_filter_plain_significance=1e-4)
        >>> plain_training(summary, args)["plain"]  # 8.7 % isolated against 1.6 % of the trusted rows
        True
    """
    significance = args.row_filter_plain_significance
    if significance is None:
        return None
    evidence = isolation_evidence(summary, significance)
    return {"plain": evidence["passed"], "evidence": evidence}


def isolated_rows_decision(summary: Mapping[str, Any], args: RowFilterArguments) -> Optional[dict[str, Any]]:
    """Whether the rows isolated as fit-early train as kept rows (`row_filter_keep_isolated_without_evidence`):
    `{"kept": bool, "evidence": isolation_evidence(...)}` at the unlearning phase's level, kept when that finds no
    shortcut; None when the knob is off.

    Example:
        >>> summary = {"rows": 6920, "fit_early": 120, "reference_low_flagged": 0.016, "reference_rows": 400}
        >>> args = RowFilterArguments(row_filter=True, row_filter_unlearn=True,
        ...     row_filter_keep_isolated_without_evidence=True)
        >>> isolated_rows_decision(summary, args)["kept"]  # 1.7 % isolated against 1.6 % of the trusted rows
        True
        >>> isolated_rows_decision({**summary, "fit_early": 600}, args)["kept"]  # 8.7 %: a shortcut, dropped
        False
    """
    if not args.row_filter_keep_isolated_without_evidence:
        return None
    evidence = isolation_evidence(summary, args.row_filter_unlearn_significance)
    return {"kept": not evidence["passed"], "evidence": evidence}


def _trusted_teacher(
    trainer: Any,
    args: RowFilterArguments,
    params: list[torch.nn.Parameter],
    initial: list[torch.Tensor],
    reference_dataset: Any,
    lr: float,
    seed: int,
    bar: Any,
    field_name: str,
    answers: Optional[TokenAnswers],
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Train the trusted teacher in eval mode (a second round on the rows it agrees with, for
    `row_filter_teacher_self_train`), restore the weights and return its log-probabilities of every training row,
    its class offset and the seconds it took. The bar's total grows by the steps it trains."""
    start = time.perf_counter()
    steps = args.row_filter_teacher_steps
    bar.total += steps * (1 + (args.row_filter_teacher_self_train is not None))
    bar.refresh()
    trainer.model.eval()
    chunked = length_chunked(trainer.model, args.row_filter_teacher_chunk_rows, "row_filter_teacher_chunk_rows")
    log_probs, offset, labels = _train_teacher(
        trainer, params, reference_dataset, steps, lr, seed, bar, field_name, answers, chunked
    )
    _restore(params, initial)
    if args.row_filter_teacher_self_train is not None:
        agreed = _agreeing_rows(log_probs, labels, args.row_filter_teacher_self_train)
        extended = torch.utils.data.ConcatDataset([reference_dataset, subset_rows(trainer.train_dataset, agreed)])
        log_probs, offset, _ = _train_teacher(
            trainer, params, extended, steps, lr, seed, bar, field_name, answers, chunked
        )
        _restore(params, initial)
    return log_probs, offset, time.perf_counter() - start


def run_row_filter(
    trainer: Any, args: RowFilterArguments, reference_dataset: Any, seed: int, progress: bool = True
) -> dict[str, Any]:
    """Run the fold probes of `trainer` on its training set and decide which rows to keep.

    Every trainable parameter is restored to its value before the call, and so are torch's random state and the
    model's train/eval mode, so the run that follows is the one `trainer` would make on the kept rows alone. The
    trusted teacher trains in eval mode (no dropout) and the fold probes in train mode, as the trainer's own steps
    do, whatever mode the model is in at the call. The teacher trains after the probes, and not at all when the
    decisions let the kept rows train on their labels alone ([`plain_training`]), unless the probes' shallow expert
    reads it (its gate, a residual expert).

    Returns:
        The report written to `row_filter.json`: `summary` (counts, cut-offs, trusted-row flag rate, probe steps,
        `seconds` of the whole call and the `scoring_seconds` of it spent scoring rows),
        `kept` (row indices), `rows` (per row: fold, loss at each probe step, `low`, `high`, `reason`) and, with
        `row_filter_plain_significance`, `plain_training`.
    """
    train_dataset = trainer.train_dataset
    num_rows = len(train_dataset)
    folds = fold_assignment(num_rows, args.row_filter_folds, seed)
    model = trainer.model
    params = [param for param in model.parameters() if param.requires_grad]
    if not params:
        raise ValueError("`row_filter=True` but the model has no trainable parameters.")
    initial = [param.detach().clone() for param in params]
    steps = args.row_filter_probe_steps
    expert_steps = args.row_filter_expert_probe_steps or []
    scored_steps = [*steps, *expert_steps]
    lr = args.row_filter_probe_learning_rate or trainer.args.learning_rate
    train_losses = torch.zeros(args.row_filter_folds, len(scored_steps), num_rows, dtype=torch.float64)
    reference_losses: list[torch.Tensor] = []
    train_groups: list[int] = [0] * num_rows
    reference_groups: list[int] = []
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    start_time, scoring_seconds, shallow = time.perf_counter(), 0.0, None
    if args.row_filter_shallow_probe is not None:  # first: it is cheap and refuses token-level labels
        with torch.random.fork_rng(devices=devices):  # each DataLoader iterator draws a seed from torch
            shallow = _shallow_probe(trainer, args, train_dataset, reference_dataset, folds)
    shallow_seconds = time.perf_counter() - start_time
    teacher_field = _teacher_field(args)
    teacher_log_probs, teacher_offset, teacher_seconds, residual = None, None, 0.0, None
    answers = None
    if teacher_field is not None:
        with torch.random.fork_rng(devices=devices):
            answers = _token_answers(trainer, train_dataset, shallow)
        if answers is not None:
            _refuse_class_label_only(args)
    total_probe_steps = scored_steps[-1]
    bar = tqdm(total=args.row_filter_folds * total_probe_steps, desc="row filter probes", disable=not progress)
    was_training = model.training
    teacher = functools.partial(
        _trusted_teacher, trainer, args, params, initial, reference_dataset, lr, seed, bar, teacher_field, answers
    )
    # The teacher is seeded on its own and starts from the restored weights, so when it trains changes nothing it
    # predicts: before the probes only when their shallow expert reads it, otherwise after the decisions, and not at
    # all when those let the kept rows train on their labels alone.
    teacher_first = args.row_filter_shallow_expert_gate is not None or args.row_filter_residual_expert is not None
    with torch.random.fork_rng(devices=devices):
        if teacher_field is not None and teacher_first:
            teacher_log_probs, teacher_offset, teacher_seconds = teacher()
        expert, gate = None, None
        if shallow is not None and args.row_filter_shallow_expert:
            if args.row_filter_residual_expert is not None:
                assert teacher_log_probs is not None  # the residual expert trains the teacher
                residual = _residual_expert(trainer, args, shallow, folds, teacher_log_probs)
            expert = shallow_expert_log_probs(shallow.train_log_probs if residual is None else residual, args)
            if args.row_filter_shallow_expert_gate is not None:
                assert teacher_log_probs is not None  # the gate trains the teacher
                gate = EXPERT_GATES[args.row_filter_shallow_expert_gate](teacher_log_probs, shallow.train_labels)
                expert = gated_log_probs(expert, gate)
            if expert_steps and shallow.classes is not None:  # the token-level loss maps responses to these classes
                trainer._response_classes = shallow.classes
        torch.manual_seed(seed)
        model.train()
        for fold in range(args.row_filter_folds):
            held_out = [row for row in range(num_rows) if folds[row] == fold]
            others = [row for row in range(num_rows) if folds[row] != fold]
            order = torch.randperm(len(others), generator=torch.Generator().manual_seed(seed + fold)).tolist()
            probe_rows = [others[i] for i in order]
            fold_reference = []
            optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=trainer.args.weight_decay)
            for step in _fold_probe_steps(trainer, params, train_dataset, probe_rows, optimizer, args, lr, expert):
                bar.update(1)
                if step in scored_steps:
                    scoring_start = time.perf_counter()
                    index = scored_steps.index(step)
                    held_losses, held_groups = _score(trainer, model, subset_rows(train_dataset, held_out))
                    train_losses[fold, index, held_out] = held_losses
                    for row, group in zip(held_out, held_groups):
                        train_groups[row] = group
                    ref_losses, reference_groups = _score(trainer, model, reference_dataset)
                    fold_reference.append(ref_losses)
                    scoring_seconds += time.perf_counter() - scoring_start
            reference_losses.append(torch.stack(fold_reference))
            _restore(params, initial)
    for param in params:
        param.grad = None
    stacked_reference = torch.stack(reference_losses)
    if shallow is not None:
        train_losses = torch.cat([train_losses, shallow.train_losses[:, None, :]], dim=1)
        stacked_reference = torch.cat([stacked_reference, shallow.reference_losses[:, None, :]], dim=1)
    # The expert steps see only what the shallow expert does not explain: they tell contradicted rows, not shortcuts.
    low_columns = [True] * len(steps) + [False] * len(expert_steps) + [True] * (shallow is not None)
    decisions = decide_rows(
        train_losses,
        train_groups,
        folds,
        stacked_reference,
        reference_groups,
        args.row_filter_max_clean_drop,
        low_columns,
        args.row_filter_extend_tails,
        CONTRADICTED_ACTIONS[args.row_filter_contradicted].flagged,
    )
    if decisions.tails == "extended on a tie":
        logger.info(
            "row filter: more trusted scores tie at an end than row_filter_max_clean_drop=%s allows a side of %d "
            "trusted rows, so a tied cut-off would flag no row: rows beyond every trusted row are scored by their "
            "distance (low_cut %.3f, high_cut %s)",
            args.row_filter_max_clean_drop,
            decisions.reference_rows,
            decisions.low_cut,
            "none" if decisions.high_cut is None else f"{decisions.high_cut:.3f}",
        )
    plain = plain_training(decisions.summary(), args)
    if teacher_field is not None and not teacher_first and not (plain is not None and plain["plain"]):
        with torch.random.fork_rng(devices=devices):
            teacher_log_probs, teacher_offset, teacher_seconds = teacher()
    bar.close()
    model.train(was_training)
    own = [train_losses[folds[row], :, row].tolist() for row in range(num_rows)]
    row_gate = None
    if shallow is not None and args.row_filter_teacher_row_gate is not None:
        row_gate = TEACHER_ROW_GATES[args.row_filter_teacher_row_gate](shallow.train_log_probs, shallow.train_labels)
    expert_scale = None
    if shallow is not None and expert is not None:
        label_log_probs = expert.gather(1, shallow.train_labels[:, None])[:, 0]
        weight = args.row_filter_shallow_expert_weight
        expert_scale = expert_gradient_scale(expert, label_log_probs, weight)
    rows = [
        {
            "fold": folds[row],
            "losses": own[row],
            "percentiles": decisions.percentiles[row],
            "low": decisions.low[row],
            "high": decisions.high[row],
            "reason": decisions.reasons[row],
        }
        | ({"shallow_log_probs": shallow.train_log_probs[row].tolist()} if shallow is not None else {})
        | ({"expert_gradient_scale": float(expert_scale[row])} if expert_scale is not None else {})
        | ({"teacher_log_probs": teacher_log_probs[row].tolist()} if teacher_log_probs is not None else {})
        | ({"expert_gate": float(gate[row])} if gate is not None else {})
        | ({"teacher_row_gate": float(row_gate[row])} if row_gate is not None else {})
        | ({"residual_log_probs": residual[row].tolist()} if residual is not None else {})
        for row in range(num_rows)
    ]
    summary = {
        **decisions.summary(),
        "probe_steps": list(steps),
        "expert_probe_steps": list(expert_steps) or None,
        "folds": args.row_filter_folds,
        "max_clean_drop": args.row_filter_max_clean_drop,
        "extend_tails": args.row_filter_extend_tails,
        "contradicted_action": args.row_filter_contradicted,
        "probe_learning_rate": lr,
        "shallow_probe": args.row_filter_shallow_probe,
        "shallow_expert": args.row_filter_shallow_expert,
        "shallow_expert_weight": args.row_filter_shallow_expert_weight,
        "shallow_expert_loss": args.row_filter_shallow_expert_loss,
        "shallow_expert_balanced": args.row_filter_shallow_expert_balanced,
        "shallow_expert_gate": args.row_filter_shallow_expert_gate,
        "expert_gate_quartiles": _quartiles(gate, decisions.kept),
        "shallow_class_prior": None if shallow is None else shallow.train_log_probs.exp().mean(dim=0).tolist(),
        "response_classes": _response_classes(shallow, answers),
        "expert_gradient_scale_quartiles": _quartiles(expert_scale, decisions.kept),
        "residual_expert": args.row_filter_residual_expert,
        "residual_regularisation": _residual_strength(args),
        "teacher_mix": args.row_filter_teacher_mix,
        "teacher_mix_gate": args.row_filter_teacher_mix_gate,
        "teacher_row_gate": args.row_filter_teacher_row_gate,
        "teacher_row_gate_open": None if row_gate is None else float(row_gate[torch.tensor(decisions.kept)].mean()),
        "teacher_steps": args.row_filter_teacher_steps if teacher_log_probs is not None else None,
        "teacher_self_train": args.row_filter_teacher_self_train,
        "teacher_label_agreement": _teacher_agreement(
            teacher_log_probs, train_groups if answers is None else answers.labels
        ),
        "teacher_offset": None if teacher_offset is None else teacher_offset.tolist(),
        "teacher_seconds": teacher_seconds,
        "seconds": time.perf_counter() - start_time,
        "scoring_seconds": scoring_seconds,
        "shallow_seconds": shallow_seconds,
    }
    # what decide_rows read, so the decisions can be recomputed from the report alone (benchmarks/recut.py)
    reference = {
        "groups": reference_groups,
        "losses": stacked_reference.tolist(),
        "row_groups": train_groups,
        "low_columns": low_columns,
    }
    report = {"summary": summary, "kept": decisions.kept, "rows": rows, "reference": reference}
    return report | ({"plain_training": plain} if plain is not None else {})
