"""Unlearning the rows the row filter isolated: the second action of fit-gap row filtering (`row_filter_unlearn`).

Dropping the rows a probe fits early is not enough: at full size the filter finds a third to nine tenths of an
insertion attack's poisoned rows, and the rest still teach the backdoor (docs/results.md). Unlearning acts on what
was found instead, as ABL does (Li et al., NeurIPS 2021): after training, a short phase keeps fitting the rows the
filter kept while pushing the isolated rows' loss *up* to a cap,

    loss = CE(batch of kept rows) + relu(cap - CE(batch of isolated rows)),

with the cap at chance (ln K for K classes): an isolated row ends up predicted no better than a coin, not pushed to
another class. Because an insertion trigger is shared by every poisoned row, unlearning the isolated ones unlearns
the trigger for all of them. The kept rows, not the trusted ones, carry the clean task through the phase, so the
trusted rows stay unseen and serve as the guard: every `eval_every` steps their accuracy is measured, and the phase
ends on the last measured state whose accuracy is at most `max_guard_drop` below where it started. The phase moves
the class balance, which the bias refit after it (`row_filter_unlearn_refit_bias`) puts back, so
`row_filter_unlearn_guard="refit_accuracy"` measures each state's accuracy under that refit, the model that is
handed over, instead of as it is ([`refit_guard_accuracy`]).

Unlearning acts only on evidence of a shortcut ([`isolation_evidence`]): the filter's low cut-off also flags a
small share of clean rows, which the trusted rows measure (their own fit-early rate). When the training rows are
isolated no more often than that (a one-sided two-proportion z-test at `row_filter_unlearn_significance`), the
isolated rows are as clean as the trusted ones, and pushing them to chance would blur the task; the phase is then
skipped and the trained model kept.

Pushing a row to chance is not neutral about its trigger: a row whose content agrees with its label (a clean-label
trigger) reaches chance only if the trigger comes to speak against that label, which then turns some triggered rows
of the target class away (measured in docs/row_filter.md). `row_filter_unlearn_target="trigger_neutral"`
(experimental) asks instead that the isolated rows be predicted as they are with their shared tokens masked out.
That cannot reach a clean-label trigger, whose isolated rows all read as the target class with or without it;
`"trigger_inserted"` (experimental) also inserts the trigger, as the isolated rows carry it ([`trigger_runs`]), into
the kept rows of every class and asks that their prediction not move ([`trigger_insertion_loss`]);
`"chance_inserted"` (the recommended defense's, `fit-gap-inserted`) asks the same of the kept rows beside the push
to chance, so that the push has to unlearn the trigger without turning it against the target on rows where it was
not isolated.

On token-level rows (a causal LM's, `MuScleLoraSFTTrainer`) whose answers form a closed set, such as label words, the
phase works on the choice of answer ([`TokenLevelRows`]): the push acts on the answer's class loss, whose chance is
ln K, the trigger is read off the prompts, and the inserted copies carry it inside the prompt with the answer whole
at the end. The two targets that mask the trigger stay for class labels.
"""

from __future__ import annotations

import math
import statistics
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any, NamedTuple, Optional

import torch
from tqdm.auto import tqdm

from .answer_classes import answer_class_nll, answer_tokens
from .bias_refit import fit_class_offset
from .length_chunks import length_chunked
from .row_filter import (
    UNLEARN_TARGETS,
    RowFilterArguments,
    _loader,
    class_log_probs,
    length_order,
    per_row_values,
    subset_rows,
    token_rows,
    two_proportion_z,
    unlearn_target_names,
)

# isolation_evidence moved to row_filter (plain training reads it there); importable from here as before.
from .row_filter import isolation_evidence as isolation_evidence
from .shallow_probe import response_classes


def correct_and_total(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """Correct predictions and their count: rows for classification logits `(batch, classes)`, labelled
    (not -100) next tokens for causal-LM logits `(batch, seq, vocab)`.

    Example:
        >>> correct_and_total(torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0]]), torch.tensor([0, 1, 1]))
        (2, 3)
    """
    if logits.dim() == 2:
        return int((logits.argmax(-1) == labels).sum()), labels.numel()
    if logits.dim() != 3:
        raise ValueError(f"accuracy needs logits of 2 or 3 dims, got shape {tuple(logits.shape)}.")
    predicted, targets = logits[:, :-1].argmax(-1), labels[:, 1:]
    mask = targets != -100
    return int(((predicted == targets) & mask).sum()), int(mask.sum())


@torch.no_grad()
def guard_accuracy(trainer: Any, model: torch.nn.Module, dataset: Any) -> float:
    """Accuracy of `model` on `dataset` (see [`correct_and_total`]), in eval mode, with the trainer's collator."""
    correct = total = 0
    model.eval()
    try:
        batches = _loader(
            trainer, subset_rows(dataset, length_order(dataset)), trainer.args.per_device_eval_batch_size
        )
        for batch in batches:
            inputs = trainer._prepare_inputs(batch)
            with trainer.autocast_smart_context_manager():
                logits = model(**inputs).logits
            right, count = correct_and_total(logits.float(), inputs["labels"])
            correct, total = correct + right, total + count
    finally:
        model.train()
    return correct / max(total, 1)


class GuardReading(NamedTuple):
    """What the guard read off the trusted rows for one state: their `accuracy` and, where the guard tests their
    loss, each row's log-probability of its label (`label_log_probs`, float64)."""

    accuracy: float
    label_log_probs: Optional[torch.Tensor] = None


def _accuracy_reading(trainer: Any, model: torch.nn.Module, dataset: Any) -> GuardReading:
    return GuardReading(guard_accuracy(trainer, model, dataset))


@torch.no_grad()
def _class_log_probs(trainer: Any, model: torch.nn.Module, dataset: Any) -> tuple[torch.Tensor, torch.Tensor]:
    log_probs, labels = per_row_values(trainer, model, dataset, class_log_probs("row_filter_unlearn_guard"))
    return log_probs, torch.tensor(labels)


def refit_guard_accuracy(trainer: Any, model: torch.nn.Module, dataset: Any) -> float:
    """Accuracy of `model` on `dataset` (class labels) after the output-bias offset that maximises the likelihood
    of their labels ([`~peft_musclelora.bias_refit.fit_class_offset`]): the accuracy the state would have once the
    bias refit that follows a phase (`row_filter_unlearn_refit_bias`) is applied, without touching the model."""
    log_probs, labels = _class_log_probs(trainer, model, dataset)
    offset = fit_class_offset(log_probs, labels)
    return float(((log_probs + offset).argmax(1) == labels).double().mean())


def _refit_accuracy_reading(trainer: Any, model: torch.nn.Module, dataset: Any) -> GuardReading:
    return GuardReading(refit_guard_accuracy(trainer, model, dataset))


def _accuracy_and_loss_reading(trainer: Any, model: torch.nn.Module, dataset: Any) -> GuardReading:
    log_probs, labels = _class_log_probs(trainer, model, dataset)
    accuracy = float((log_probs.argmax(1) == labels).double().mean())
    return GuardReading(accuracy, log_probs.gather(1, labels[:, None]).squeeze(1))


def paired_loss_rise_z(before: torch.Tensor, after: torch.Tensor) -> float:
    """The paired z of the rows' loss rise from `before` to `after` (each row's log-probability of its label): the
    mean of `before - after` over its standard error; > 0 when the loss rose. 0 for identical readings.

    Example:
        >>> before = torch.tensor([-0.1, -0.2, -0.3, -0.4])
        >>> round(paired_loss_rise_z(before, before - torch.tensor([0.5, 0.4, 0.6, 0.5])), 1)  # every row worse
        12.2
        >>> paired_loss_rise_z(before, before)
        0.0
    """
    rise = (before - after).double()
    spread = float(rise.std()) if rise.numel() > 1 else 0.0
    mean = float(rise.mean())
    if spread == 0.0:
        return 0.0 if mean == 0.0 else math.copysign(math.inf, mean)
    return mean / (spread / math.sqrt(rise.numel()))


class Guard(NamedTuple):
    """One `row_filter_unlearn_guard`: what it reads off the trusted rows for a state, and whether it accepts the
    state given the reading at the start of the phase (the reading's extra report fields come from `report`)."""

    read: Callable[[Any, torch.nn.Module, Any], GuardReading]
    accepts: Callable[[GuardReading, GuardReading, RowFilterArguments], bool]
    report: Callable[[GuardReading, GuardReading], dict[str, float]]


def _within_drop(start: GuardReading, reading: GuardReading, args: RowFilterArguments) -> bool:
    return reading.accuracy >= start.accuracy - args.row_filter_unlearn_max_guard_drop


def _within_drop_and_no_loss_rise(start: GuardReading, reading: GuardReading, args: RowFilterArguments) -> bool:
    threshold = statistics.NormalDist().inv_cdf(1 - args.row_filter_unlearn_guard_significance)
    rise = paired_loss_rise_z(start.label_log_probs, reading.label_log_probs)
    return _within_drop(start, reading, args) and rise <= threshold


def _no_report(start: GuardReading, reading: GuardReading) -> dict[str, float]:
    return {}


def _loss_rise_report(start: GuardReading, reading: GuardReading) -> dict[str, float]:
    return {"loss_rise_z": paired_loss_rise_z(start.label_log_probs, reading.label_log_probs)}


#: What the guard reads and accepts (`row_filter_unlearn_guard`; declared in `row_filter.UNLEARN_GUARDS`).
GUARDS: dict[str, Guard] = {
    "accuracy": Guard(_accuracy_reading, _within_drop, _no_report),
    "refit_accuracy": Guard(_refit_accuracy_reading, _within_drop, _no_report),
    "accuracy_and_loss": Guard(_accuracy_and_loss_reading, _within_drop_and_no_loss_rise, _loss_rise_report),
}


def _shuffled_batches(trainer: Any, dataset: Any, batch_size: int, generator: torch.Generator) -> Iterator[Any]:
    """Endless batches of `dataset`, reshuffled (seeded) at every pass."""
    while True:
        order = torch.randperm(len(dataset), generator=generator).tolist()
        yield from _loader(trainer, subset_rows(dataset, order), batch_size)


def _class_count(logits: torch.Tensor, classes: Optional[list[tuple[int, ...]]] = None) -> Optional[int]:
    """K: the answer `classes` of token-level rows, else the classes of classification `logits` `(batch, classes)`;
    None for token-level rows with free-form answers (no chance level)."""
    if classes is not None:
        return len(classes)
    return logits.size(-1) if logits.dim() == 2 else None


def _default_cap(logits: torch.Tensor, classes: Optional[list[tuple[int, ...]]] = None) -> float:
    """Chance, ln K: among the `logits`' classes, or among the answer `classes` of token-level rows."""
    count = _class_count(logits, classes)
    if count is None:
        raise ValueError(
            "`row_filter_unlearn_cap=None` means chance among the classes, which token-level rows have only when "
            "their answers form a closed set (label words); these do not: set row_filter_unlearn_cap to a loss in "
            "nats (e.g. twice the trusted rows' loss)."
        )
    return math.log(count)


@dataclass(frozen=True)
class TokenLevelRows:
    """What the phase reads off token-level (causal-LM) rows: the isolated and the kept rows' prompts, as
    [`trigger_tokens`] takes rows (the answers stay out: the isolated rows share the target's answer, which would
    read as a trigger), and the rows' closed answer set (`classes`, None for free-form answers), among which the
    push to chance acts on the choice of answer ([`~answer_classes.answer_class_nll`])."""

    isolated_prompts: list[dict[str, list[int]]]
    kept_prompts: list[dict[str, list[int]]]
    classes: Optional[list[tuple[int, ...]]]


def _prompts(ids: list[list[int]]) -> list[dict[str, list[int]]]:
    return [{"input_ids": row} for row in ids]


def _rows_untouched_rng(trainer: Any, dataset: Any) -> Any:
    """[`token_rows`] of `dataset` with torch's random state as it was (each loader iterator draws a seed from it)."""
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
        return token_rows(trainer, dataset)


def token_level_rows(trainer: Any, isolated_dataset: Any, kept_dataset: Any) -> Optional[TokenLevelRows]:
    """The [`TokenLevelRows`] of the two datasets when their labels are token-level, else None (class labels)."""
    if not _rows_untouched_rng(trainer, subset_rows(isolated_dataset, [0])).responses:
        return None
    isolated, kept = _rows_untouched_rng(trainer, isolated_dataset), _rows_untouched_rng(trainer, kept_dataset)
    try:
        classes: Optional[list[tuple[int, ...]]] = response_classes(isolated.responses + kept.responses)
    except ValueError:  # free-form answers: the push acts on the token loss, with a cap set in nats
        classes = None
    return TokenLevelRows(_prompts(isolated.ids), _prompts(kept.ids), classes)


def trigger_tokens(isolated_dataset: Any, kept_dataset: Any, min_z: float) -> list[dict[str, Any]]:
    """The token ids that occur in more of the isolated rows than of the kept rows by a two-proportion z above
    `min_z`, highest z first: `{"id", "z", "isolated_share", "kept_share"}` each (presence per row, as Z-defence
    counts words). An insertion trigger is shared by the poisoned rows, which the filter isolates.

    Example:
        >>> isolated = [{"input_ids": [101, 7, 5, 102]}] * 40
        >>> kept = [{"input_ids": [101, 5, 102]}] * 400 + [{"input_ids": [101, 7, 102]}] * 4
        >>> [(token["id"], round(token["z"], 1)) for token in trigger_tokens(isolated, kept, 10.0)]
        [(7, 20.0)]
    """
    isolated_counts, kept_counts = _token_presence(isolated_dataset), _token_presence(kept_dataset)
    n_isolated, n_kept = max(len(isolated_dataset), 1), max(len(kept_dataset), 1)
    found = []
    for token, in_isolated in isolated_counts.items():
        in_kept = kept_counts.get(token, 0)
        z = two_proportion_z(in_isolated, n_isolated, in_kept, n_kept)
        if z > min_z:
            found.append(
                {"id": token, "z": z, "isolated_share": in_isolated / n_isolated, "kept_share": in_kept / n_kept}
            )
    return sorted(found, key=lambda token: -token["z"])


def _token_presence(dataset: Any) -> Counter[int]:
    """How many rows of `dataset` hold each token id (at least once)."""
    counts: Counter[int] = Counter()
    for index in range(len(dataset)):
        counts.update({int(token) for token in dataset[index]["input_ids"]})
    return counts


def _check_class_logits(logits: torch.Tensor, targets: str) -> None:
    """The masking targets compare class predictions with and without the trigger masked out; token-level logits
    have no one prediction per row to compare."""
    if logits.dim() != 2:
        raise ValueError(
            f"`row_filter_unlearn_target` values {targets} compare class predictions with the trigger masked out and "
            "work on class labels only; these rows have token-level (causal-LM) labels: use "
            f"{unlearn_target_names(lambda target: not target.masks_trigger)}."
        )


def trigger_neutral_loss(
    model: Any, inputs: Mapping[str, Any], logits: torch.Tensor, trigger_ids: torch.Tensor
) -> torch.Tensor:
    """KL(p(row with the trigger tokens masked out) || p(row)), averaged over the batch: the target is the model's
    own prediction, in eval mode and without gradient, of the row whose `trigger_ids` positions are removed from the
    attention mask; the trigger then comes to change nothing."""
    _check_class_logits(logits, unlearn_target_names(lambda target: target.masks_trigger))
    masked = dict(inputs)
    masked["attention_mask"] = inputs["attention_mask"] * ~torch.isin(inputs["input_ids"], trigger_ids)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        target = torch.log_softmax(model(**masked).logits.float(), dim=-1)
    model.train(was_training)
    return torch.nn.functional.kl_div(
        torch.log_softmax(logits.float(), dim=-1), target, log_target=True, reduction="batchmean"
    )


def trigger_runs(isolated_dataset: Any, trigger_ids: set[int]) -> list[list[list[int]]]:
    """Each isolated row's runs of consecutive `trigger_ids`, in order, rows without any left out: the trigger as the
    poisoned rows carry it (a phrase stays a phrase, and scattered words stay as many).

    Example:
        >>> rows = [{"input_ids": [101, 9, 7, 8, 5, 7, 102]}, {"input_ids": [101, 5, 102]}]
        >>> trigger_runs(rows, {7, 8})
        [[[7, 8], [7]]]
    """
    patterns = []
    for index in range(len(isolated_dataset)):
        runs: list[list[int]] = []
        previous_in_trigger = False
        for token in isolated_dataset[index]["input_ids"]:
            in_trigger = int(token) in trigger_ids
            if in_trigger and previous_in_trigger:
                runs[-1].append(int(token))
            elif in_trigger:
                runs.append([int(token)])
            previous_in_trigger = in_trigger
        if runs:
            patterns.append(runs)
    return patterns


def _fitting_runs(runs: list[list[int]], room: int) -> list[list[int]]:
    """The leading runs of `runs` whose tokens fit in `room` (at least the first run, cut to `room`)."""
    fitted, used = [], 0
    for run in runs:
        if used + len(run) > room:
            break
        fitted.append(run)
        used += len(run)
    return fitted or [runs[0][: max(room, 1)]]


@dataclass(frozen=True)
class Insertion:
    """Where one row's trigger goes: the row's token positions kept (`real`, content cut to fit the model), and
    each run of `runs` inserted before `real[gap]` for its gap in `gaps` (ascending)."""

    real: torch.Tensor
    gaps: list[int]
    runs: list[list[int]]


def draw_insertions(
    mask: torch.Tensor,
    patterns: list[list[list[int]]],
    generator: torch.Generator,
    max_length: int,
    labels: Optional[torch.Tensor] = None,
) -> list[Insertion]:
    """One [`Insertion`] per row of the attention `mask`: a pattern of `patterns` ([`trigger_runs`]) drawn at random,
    every run of it at its own random position between the row's first and last real token (special tokens at
    either end stay there), in the pattern's order; content before the last token is cut to fit `max_length`.

    With token-level `labels` (causal-LM rows, -100 on the prompt) the row's answer and the prompt's last token
    before it play the last token's part: the runs go into the prompt, after its first token and before its last,
    and the answer stays whole at the end.

    Example:
        >>> mask = torch.ones(1, 5, dtype=torch.long)
        >>> labels = torch.tensor([[-100, -100, -100, 11, 1]])  # a three-token prompt, then its answer
        >>> [insertion.gaps for insertion in draw_insertions(
        ...     mask, [[[7]], [[8]]], torch.Generator().manual_seed(0), 64, labels)][0][0] in (1, 2)
        True
    """
    insertions = []
    for row in range(mask.size(0)):
        real = mask[row].nonzero().flatten()
        tail = 1 if labels is None else _kept_last(labels[row, real])
        drawn = patterns[int(torch.randint(len(patterns), (1,), generator=generator))]
        runs = _fitting_runs(drawn, max(max_length - 1 - tail, 1))
        room = max_length - sum(len(run) for run in runs)
        if len(real) > room:
            real = torch.cat([real[: max(room - tail, 0)], real[len(real) - tail :]])
        if len(real) > tail:
            gaps = sorted((1 + torch.randint(len(real) - tail, (len(runs),), generator=generator)).tolist())
        else:
            gaps = [len(real) if tail == 1 else 0] * len(runs)
        insertions.append(Insertion(real, gaps, runs))
    return insertions


def _kept_last(labels: torch.Tensor) -> int:
    """How many of a token-level row's real positions (`labels` of its real tokens) stay at its end: its answer and
    the prompt's last token before it, which the answer follows in the training rows (1 for a row without an
    answer: its last token, as a classification row)."""
    labelled = (labels != -100).nonzero().flatten()
    return min(len(labels) - int(labelled[0]) + 1, len(labels)) if len(labelled) else 1


#: What padding holds in a per-token entry other than `input_ids` (the pad id) and 0: token-level labels are not
#: trained there, as the collators pad them.
_PADDING = {"labels": -100}


def apply_insertions(inputs: Mapping[str, Any], insertions: list[Insertion], pad_id: int) -> dict[str, Any]:
    """`inputs` (a padded batch) with each row's [`Insertion`] made. Every `(batch, seq)` tensor is rebuilt:
    `input_ids` take the runs, `attention_mask` ones, any other (`token_type_ids`) the value of the token before;
    the padding side is kept, and every other entry (class `labels`) is passed on as it is. Token-level `labels`
    (one per token) are rebuilt like `token_type_ids`: an inserted token takes the label of the prompt token before
    it, -100, so the answer's labels move with it; their padding is -100, as the collators pad them."""
    mask = inputs["attention_mask"]
    left_padded = bool((mask[:, 0] == 0).any() and (mask[:, -1] == 1).all())
    per_token = {key: value for key, value in inputs.items() if torch.is_tensor(value) and value.shape == mask.shape}
    rebuilt: dict[str, list[torch.Tensor]] = {key: [] for key in per_token}
    for row, insertion in enumerate(insertions):
        for key, values in per_token.items():
            kept = values[row, insertion.real]
            pieces, start = [], 0
            for gap, run in zip(insertion.gaps, insertion.runs):
                if key == "input_ids":
                    middle = torch.tensor(run, dtype=values.dtype, device=values.device)
                elif key == "attention_mask":
                    middle = torch.ones(len(run), dtype=values.dtype, device=values.device)
                else:
                    middle = kept[max(gap - 1, 0)].expand(len(run)) if len(kept) else values.new_zeros(len(run))
                pieces += [kept[start:gap], middle]
                start = gap
            rebuilt[key].append(torch.cat([*pieces, kept[start:]]))
    longest = max(len(row) for row in rebuilt["input_ids"])
    out = dict(inputs)
    for key, rows in rebuilt.items():
        fill = _PADDING.get(key, 0) if key != "input_ids" else pad_id
        sides = [(longest - len(row), 0) if left_padded else (0, longest - len(row)) for row in rows]
        out[key] = torch.stack([torch.nn.functional.pad(row, side, value=fill) for row, side in zip(rows, sides)])
    return out


def insert_runs(
    inputs: Mapping[str, Any],
    patterns: list[list[list[int]]],
    generator: torch.Generator,
    pad_id: int,
    max_length: int,
) -> dict[str, Any]:
    """`inputs` (a padded batch) with a pattern of `patterns` inserted into each row ([`draw_insertions`], then
    [`apply_insertions`]).

    Example:
        >>> batch = {"input_ids": torch.tensor([[101, 5, 6, 102], [101, 102, 0, 0]]),
        ...          "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]), "labels": torch.tensor([0, 1])}
        >>> out = insert_runs(batch, [[[7, 8], [9]]], torch.Generator().manual_seed(0), pad_id=0, max_length=16)
        >>> out["input_ids"][1].tolist(), out["attention_mask"][1].tolist(), out["labels"].tolist()
        ([101, 7, 8, 9, 102, 0, 0], [1, 1, 1, 1, 1, 0, 0], [0, 1])
    """
    return apply_insertions(inputs, draw_insertions(inputs["attention_mask"], patterns, generator, max_length), pad_id)


def placebo_tokens(
    kept_counts: Mapping[int, int],
    reference_counts: Mapping[int, int],
    trigger_ids: set[int],
    kept_rows: int,
    size: int = 50,
) -> dict[int, list[int]]:
    """For each of `trigger_ids`, the other token ids of the kept rows (`kept_counts`: rows holding each) that are
    about as common in the trusted rows (`reference_counts`) as it is: all of those at the nearest counts, at least
    `size` of them. Frequencies come from the trusted rows because the kept rows still hold the poisoned rows the
    filter missed, which make a trigger word look common; tokens in every kept row (special tokens) are left out.

    Example:
        >>> kept = {101: 6, 7: 3, 4: 2, 5: 1, 6: 1, 8: 4}
        >>> trusted = {101: 40, 4: 0, 8: 12}
        >>> placebo_tokens(kept, trusted, {7}, kept_rows=6, size=2)  # 7 is in no trusted row: nor are 4, 5, 6
        {7: [4, 5, 6]}
    """
    pool = [token for token, count in kept_counts.items() if token not in trigger_ids and count < kept_rows]
    by_count: dict[int, list[int]] = {}
    for token in pool:
        by_count.setdefault(reference_counts.get(token, 0), []).append(token)
    placebos = {}
    for trigger in sorted(trigger_ids):
        own = reference_counts.get(trigger, 0)
        chosen: list[int] = []
        for count in sorted(by_count, key=lambda count: (abs(count - own), count)):
            if len(chosen) >= size:
                break
            chosen += by_count[count]
        placebos[trigger] = sorted(chosen)
    return placebos


def with_placebos(
    insertions: list[Insertion], placebos: Mapping[int, list[int]], generator: torch.Generator
) -> list[Insertion]:
    """`insertions` with every trigger token replaced by one of its placebos ([`placebo_tokens`]), drawn at random:
    as many other words, as common, at the same places."""

    def placebo(token: int) -> int:
        choices = placebos[token]
        return choices[int(torch.randint(len(choices), (1,), generator=generator))]

    return [
        replace(insertion, runs=[[placebo(token) for token in run] for run in insertion.runs])
        for insertion in insertions
    ]


def trigger_insertion_loss(model: Any, reference: Mapping[str, Any], inserted: Mapping[str, Any]) -> torch.Tensor:
    """KL(p(reference) || p(inserted)), averaged over the batch: the target is the model's own prediction, in eval
    mode and without gradient, of `reference` (the rows as they are, or with placebo words where `inserted` has the
    trigger), the prediction is of `inserted` ([`apply_insertions`]) with gradient; the trigger then comes to do to
    rows of any class what the reference does. On token-level rows (a causal LM's logits, the answers labelled) a
    row's prediction is its next-token distributions along its own answer: the KL is summed over the answer's
    positions, which [`apply_insertions`] moved together with the answer."""
    logits = model(**inserted).logits
    was_training = model.training
    model.eval()
    with torch.no_grad():
        target_logits = model(**reference).logits
    model.train(was_training)
    rows = logits.size(0)
    if logits.dim() == 3:
        inserted_rows, inserted_positions, _ = answer_tokens(inserted["labels"])
        reference_rows, reference_positions, _ = answer_tokens(reference["labels"])
        if not torch.equal(inserted_rows, reference_rows):
            raise ValueError("the rows with the trigger inserted must keep their answers' lengths.")
        logits, target_logits = (
            logits[inserted_rows, inserted_positions],
            target_logits[reference_rows, reference_positions],
        )
    target = torch.log_softmax(target_logits.float(), dim=-1)
    predicted = torch.log_softmax(logits.float(), dim=-1)
    return torch.nn.functional.kl_div(predicted, target, log_target=True, reduction="sum") / rows


def _pad_and_max_length(trainer: Any) -> tuple[int, int]:
    """The pad id (the model's, else the tokenizer's, else 0) and the longest input the model takes."""
    config = trainer.model.config
    tokenizer = getattr(trainer, "processing_class", None)
    pad_id = getattr(config, "pad_token_id", None)
    pad_id = getattr(tokenizer, "pad_token_id", None) if pad_id is None else pad_id
    return (0 if pad_id is None else int(pad_id)), int(getattr(config, "max_position_embeddings", None) or 1 << 16)


def _pattern_counts(trainer: Any, patterns: list[list[list[int]]]) -> list[dict[str, Any]]:
    """The 20 most frequent trigger patterns with their row counts (and each run's text when there is a tokenizer)."""
    tokenizer = getattr(trainer, "processing_class", None)
    counts = Counter(tuple(tuple(run) for run in pattern) for pattern in patterns)
    return [
        {"runs": [list(run) for run in pattern], "rows": rows}
        | ({"text": [tokenizer.decode(list(run)) for run in pattern]} if hasattr(tokenizer, "decode") else {})
        for pattern, rows in counts.most_common(20)
    ]


def _with_token_text(trainer: Any, found: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`found` with each token's text when the trainer holds a tokenizer (`processing_class`), for the report."""
    tokenizer = getattr(trainer, "processing_class", None)
    if not hasattr(tokenizer, "convert_ids_to_tokens"):
        return [dict(token) for token in found]
    return [{**token, "token": tokenizer.convert_ids_to_tokens(int(token["id"]))} for token in found]


def _warn_past_chance(cap: float, classes: Optional[int]) -> None:
    """Warn when a cap on `classes` classes (None: free-form answers, no chance level) lies past chance: the phase
    then teaches the isolated rows' trigger as evidence against their label, a backdoor of its own (measured:
    docs/row_filter.md)."""
    if classes is not None and cap > math.log(classes) + 1e-6:
        warnings.warn(
            f"row_filter_unlearn_cap={cap} is past chance for {classes} classes (ln K = "
            f"{math.log(classes):.2f} nats): the isolated rows are pushed to another class, so whatever "
            "they share (an insertion trigger) comes to predict that class. At full size 3 nats drove AddSent's ASR "
            "to 0 and left 0-2 % of the target class's triggered test rows with their label (86-89 % untriggered): "
            "a backdoor towards the other class (docs/row_filter.md).",
            stacklevel=3,
        )


def run_unlearning(
    trainer: Any,
    args: RowFilterArguments,
    kept_dataset: Any,
    isolated_dataset: Any,
    reference_dataset: Any,
    seed: int,
    progress: bool = True,
    evidence: Optional[Mapping[str, Any]] = None,
) -> dict[str, Any]:
    """Unlearn `isolated_dataset` on `trainer.model` in place while fitting `kept_dataset`, guarded by the
    accuracy on `reference_dataset` (the trusted rows); see the module docstring.

    Every trainable parameter ends at the chosen (guarded) state; torch's random state is restored. With an
    `evidence` ([`isolation_evidence`]) that did not pass, nothing is trained and the model is left as it is.

    Returns:
        The report stored under `unlearning` in `row_filter.json`: `isolated` rows, `evidence`, `skipped` (why
        nothing was trained, or None), `target` (`row_filter_unlearn_target`), under a target that reads the
        trigger `trigger_tokens`, under one that inserts it `trigger_runs` (the 20 most frequent patterns of
        runs, with their row counts), `insertion_target` and `placebo_tokens`, `cap`, `learning_rate`,
        `steps`, `guard_measure` (`row_filter_unlearn_guard`), the `guard` trajectory (step, the measured
        trusted accuracy, isolated rows' mean loss of the batch),
        `chosen_step`, `guard_start` / `guard_end` and `seconds`.
    """
    model = trainer.model
    params = [param for param in model.parameters() if param.requires_grad]
    lr = args.row_filter_unlearn_learning_rate or trainer.args.learning_rate
    report: dict[str, Any] = {"isolated": len(isolated_dataset), "learning_rate": lr, "cap": None, "steps": 0}
    report.update(evidence=None if evidence is None else dict(evidence), skipped=None)
    if len(isolated_dataset) == 0 or not params:
        report["skipped"] = "no isolated rows" if params else "no trainable parameters"
    elif evidence is not None and not evidence["passed"]:
        report["skipped"] = (
            f"no evidence of a shortcut: {evidence['isolated_share']:.2%} of the training rows isolated against "
            f"{evidence['reference_share']:.2%} of the trusted rows (z = {evidence['z']:.2f}, needs > "
            f"{evidence['threshold']:.2f})"
        )
    target = UNLEARN_TARGETS[args.row_filter_unlearn_target]
    report["target"] = args.row_filter_unlearn_target
    report["guard_measure"] = args.row_filter_unlearn_guard
    token_level = None if report["skipped"] is not None else token_level_rows(trainer, isolated_dataset, kept_dataset)
    isolated_view, kept_view = (
        (isolated_dataset, kept_dataset)
        if token_level is None
        else (token_level.isolated_prompts, token_level.kept_prompts)
    )
    classes = None if token_level is None else token_level.classes
    if target.reads_trigger and report["skipped"] is None:
        found = trigger_tokens(isolated_view, kept_view, args.row_filter_unlearn_trigger_z)
        report["trigger_tokens"] = _with_token_text(trainer, found)
        # Without a trigger token there is nothing to mask or insert; the push to chance still has its rows.
        if not found and target.masks_trigger:
            report["skipped"] = (
                f"no trigger token: no token is in more of the isolated rows than of the kept rows by z > "
                f"{args.row_filter_unlearn_trigger_z}"
            )
    if report["skipped"] is not None:
        return {**report, "guard": [], "chosen_step": 0, "guard_start": None, "guard_end": None, "seconds": 0.0}
    trigger_ids = torch.tensor([token["id"] for token in report.get("trigger_tokens", [])], dtype=torch.long)
    inserting = target.inserts_trigger and len(trigger_ids) > 0
    patterns = trigger_runs(isolated_view, set(trigger_ids.tolist())) if inserting else []
    placebo = inserting and args.row_filter_unlearn_insertion_target == "placebo"
    placebos = {}
    if placebo:
        reference_view = (
            reference_dataset if token_level is None else _prompts(_rows_untouched_rng(trainer, reference_dataset).ids)
        )
        kept_counts, reference_counts = _token_presence(kept_view), _token_presence(reference_view)
        placebos = placebo_tokens(kept_counts, reference_counts, set(trigger_ids.tolist()), len(kept_dataset))
    if target.inserts_trigger:
        report["trigger_runs"] = _pattern_counts(trainer, patterns)
        report["insertion_target"] = args.row_filter_unlearn_insertion_target
        report["placebo_tokens"] = [
            {"id": token, "placebos": len(choices), "first": choices[:20]} for token, choices in placebos.items()
        ]
    insertion_generator = torch.Generator().manual_seed(seed + 1)
    pad_id, max_length = _pad_and_max_length(trainer)
    start_time = time.perf_counter()
    batch_size = trainer.args.per_device_train_batch_size
    generator = torch.Generator().manual_seed(seed)
    kept_batches = _shuffled_batches(trainer, kept_dataset, batch_size, generator)
    isolated_batches = _shuffled_batches(trainer, isolated_dataset, batch_size, generator)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=trainer.args.weight_decay)
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    bar = tqdm(total=args.row_filter_unlearn_steps, desc="row filter unlearning", disable=not progress)
    model.train()
    guard_rule = GUARDS[args.row_filter_unlearn_guard]
    # The phase's own passes; the guard already scores its rows in length order.
    phase_model = length_chunked(model, args.row_filter_unlearn_chunk_rows, "row_filter_unlearn_chunk_rows")
    # The loaders draw their base seeds from torch's global generator: fork it so the caller's stream is untouched.
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        start = guard_rule.read(trainer, model, reference_dataset)
        start_accuracy = start.accuracy
        guard: list[dict[str, float]] = [{"step": 0, "accuracy": start_accuracy}]
        chosen = [param.detach().clone() for param in params]
        chosen_step, cap = 0, args.row_filter_unlearn_cap
        for step in range(1, args.row_filter_unlearn_steps + 1):
            with trainer.compute_loss_context_manager():
                kept_inputs = trainer._prepare_inputs(next(kept_batches))
                # a copy: the row filter's loss takes the labels and its per-row columns out of the batch it gets,
                # and the inserted copies below need the token-level labels
                fit_loss = trainer.compute_loss(phase_model, dict(kept_inputs))
                isolated_inputs = trainer._prepare_inputs(next(isolated_batches))
                outputs = phase_model(**isolated_inputs)
                if inserting:
                    # only what the model takes: the kept rows may carry the row filter's per-row columns
                    reference = {key: value for key, value in kept_inputs.items() if key in isolated_inputs}
                    mask, labels = reference["attention_mask"], None if token_level is None else reference["labels"]
                    insertions = draw_insertions(mask, patterns, insertion_generator, max_length, labels)
                    inserted = apply_insertions(reference, insertions, pad_id)
                    if placebo:
                        placebo_insertions = with_placebos(insertions, placebos, insertion_generator)
                        reference = apply_insertions(reference, placebo_insertions, pad_id)
                    fit_loss = fit_loss + trigger_insertion_loss(phase_model, reference, inserted)
            if classes is None:
                isolated_loss = outputs.loss.float()
            else:  # the choice of answer, whose chance level is ln K (the token loss also counts the answer's
                # end-of-sequence, which makes ln K on it past chance)
                isolated_loss = answer_class_nll(outputs.logits, isolated_inputs["labels"], classes).mean()
            if target.masks_trigger:
                isolated_term = trigger_neutral_loss(
                    phase_model, isolated_inputs, outputs.logits, trigger_ids.to(isolated_inputs["input_ids"].device)
                )
            else:
                if cap is None:
                    cap = _default_cap(outputs.logits, classes)
                elif step == 1:
                    _warn_past_chance(cap, _class_count(outputs.logits, classes))
                isolated_term = torch.relu(cap - isolated_loss)
            (fit_loss + isolated_term).backward()
            if trainer.args.max_grad_norm and trainer.args.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, trainer.args.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            bar.update(1)
            if step % args.row_filter_unlearn_eval_every == 0 or step == args.row_filter_unlearn_steps:
                reading = guard_rule.read(trainer, model, reference_dataset)
                point = {"step": step, "accuracy": reading.accuracy, "isolated_loss": float(isolated_loss.detach())}
                guard.append(point | guard_rule.report(start, reading))
                if guard_rule.accepts(start, reading, args):
                    chosen = [param.detach().clone() for param in params]
                    chosen_step = step
    bar.close()
    with torch.no_grad():
        for param, value in zip(params, chosen):
            param.copy_(value)
    for param in params:
        param.grad = None
    del optimizer
    end_accuracy = next(point["accuracy"] for point in guard if point["step"] == chosen_step)
    return {
        **report,
        "cap": cap,
        "steps": args.row_filter_unlearn_steps,
        "guard": guard,
        "chosen_step": chosen_step,
        "guard_start": start_accuracy,
        "guard_end": end_accuracy,
        "seconds": time.perf_counter() - start_time,
    }
