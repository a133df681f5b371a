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
ends on the last measured state whose accuracy is at most `max_guard_drop` below where it started.

Unlearning acts only on evidence of a shortcut ([`isolation_evidence`]): the filter's low cut-off also flags a
small share of clean rows, which the trusted rows measure (their own fit-early rate). When the training rows are
isolated no more often than that (a one-sided two-proportion z-test at `row_filter_unlearn_significance`), the
isolated rows are as clean as the trusted ones, and pushing them to chance would blur the task; the phase is then
skipped and the trained model kept.

Pushing a row to chance is not neutral about its trigger: a row whose content agrees with its label (a clean-label
trigger) reaches chance only if the trigger comes to speak against that label, which then turns some triggered rows
of the target class away (measured in docs/row_filter.md). `row_filter_unlearn_target="trigger_neutral"`
(experimental) asks instead that the isolated rows be predicted as they are with their shared tokens masked out.
"""

from __future__ import annotations

import math
import time
import warnings
from collections import Counter
from collections.abc import Iterator, Mapping
from typing import Any, Optional

import torch
from tqdm.auto import tqdm

from .row_filter import RowFilterArguments, _loader, length_order, subset_rows, two_proportion_z

# isolation_evidence moved to row_filter (plain training reads it there); importable from here as before.
from .row_filter import isolation_evidence as isolation_evidence


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


def _shuffled_batches(trainer: Any, dataset: Any, batch_size: int, generator: torch.Generator) -> Iterator[Any]:
    """Endless batches of `dataset`, reshuffled (seeded) at every pass."""
    while True:
        order = torch.randperm(len(dataset), generator=generator).tolist()
        yield from _loader(trainer, subset_rows(dataset, order), batch_size)


def _default_cap(logits: torch.Tensor) -> float:
    if logits.dim() != 2:
        raise ValueError(
            "`row_filter_unlearn_cap=None` means chance among the classes, which a token-level (generation) loss "
            "does not have: set row_filter_unlearn_cap to a loss in nats (e.g. twice the trusted rows' loss)."
        )
    return math.log(logits.size(-1))


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


def trigger_neutral_loss(
    model: Any, inputs: Mapping[str, Any], logits: torch.Tensor, trigger_ids: torch.Tensor
) -> torch.Tensor:
    """KL(p(row with the trigger tokens masked out) || p(row)), averaged over the batch: the target is the model's
    own prediction, in eval mode and without gradient, of the row whose `trigger_ids` positions are removed from the
    attention mask; the trigger then comes to change nothing."""
    if logits.dim() != 2:
        raise ValueError(
            "`row_filter_unlearn_target='trigger_neutral'` compares class predictions with and without the trigger "
            "and works on class labels only; these rows have token-level (causal-LM) labels: use 'chance' with a "
            "row_filter_unlearn_cap."
        )
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


def _with_token_text(trainer: Any, found: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`found` with each token's text when the trainer holds a tokenizer (`processing_class`), for the report."""
    tokenizer = getattr(trainer, "processing_class", None)
    if not hasattr(tokenizer, "convert_ids_to_tokens"):
        return [dict(token) for token in found]
    return [{**token, "token": tokenizer.convert_ids_to_tokens(int(token["id"]))} for token in found]


def _warn_past_chance(cap: float, logits: torch.Tensor) -> None:
    """Warn when a cap on class labels lies past chance: the phase then teaches the isolated rows' trigger as
    evidence against their label, a backdoor of its own (measured: docs/row_filter.md)."""
    if logits.dim() == 2 and cap > math.log(logits.size(-1)) + 1e-6:
        warnings.warn(
            f"row_filter_unlearn_cap={cap} is past chance for {logits.size(-1)} classes (ln K = "
            f"{math.log(logits.size(-1)):.2f} nats): the isolated rows are pushed to another class, so whatever "
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
        nothing was trained, or None), `target` (`row_filter_unlearn_target`) and, under "trigger_neutral",
        `trigger_tokens`, `cap`, `learning_rate`, `steps`, the `guard` trajectory (step, trusted accuracy, isolated
        rows' mean loss of the batch), `chosen_step`, `guard_start` / `guard_end` and `seconds`.
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
    neutral = args.row_filter_unlearn_target == "trigger_neutral"
    report["target"] = args.row_filter_unlearn_target
    if neutral and report["skipped"] is None:
        found = trigger_tokens(isolated_dataset, kept_dataset, args.row_filter_unlearn_trigger_z)
        report["trigger_tokens"] = _with_token_text(trainer, found)
        if not found:
            report["skipped"] = (
                f"no trigger token: no token is in more of the isolated rows than of the kept rows by z > "
                f"{args.row_filter_unlearn_trigger_z}"
            )
    if report["skipped"] is not None:
        return {**report, "guard": [], "chosen_step": 0, "guard_start": None, "guard_end": None, "seconds": 0.0}
    trigger_ids = torch.tensor([token["id"] for token in report.get("trigger_tokens", [])], dtype=torch.long)
    start_time = time.perf_counter()
    batch_size = trainer.args.per_device_train_batch_size
    generator = torch.Generator().manual_seed(seed)
    kept_batches = _shuffled_batches(trainer, kept_dataset, batch_size, generator)
    isolated_batches = _shuffled_batches(trainer, isolated_dataset, batch_size, generator)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=trainer.args.weight_decay)
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    bar = tqdm(total=args.row_filter_unlearn_steps, desc="row filter unlearning", disable=not progress)
    model.train()
    # The loaders draw their base seeds from torch's global generator: fork it so the caller's stream is untouched.
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        start_accuracy = guard_accuracy(trainer, model, reference_dataset)
        floor = start_accuracy - args.row_filter_unlearn_max_guard_drop
        guard: list[dict[str, float]] = [{"step": 0, "accuracy": start_accuracy}]
        chosen = [param.detach().clone() for param in params]
        chosen_step, cap = 0, args.row_filter_unlearn_cap
        for step in range(1, args.row_filter_unlearn_steps + 1):
            with trainer.compute_loss_context_manager():
                fit_loss = trainer.compute_loss(model, trainer._prepare_inputs(next(kept_batches)))
                isolated_inputs = trainer._prepare_inputs(next(isolated_batches))
                outputs = model(**isolated_inputs)
            isolated_loss = outputs.loss.float()
            if neutral:
                isolated_term = trigger_neutral_loss(
                    model, isolated_inputs, outputs.logits, trigger_ids.to(isolated_inputs["input_ids"].device)
                )
            else:
                if cap is None:
                    cap = _default_cap(outputs.logits)
                elif step == 1:
                    _warn_past_chance(cap, outputs.logits)
                isolated_term = torch.relu(cap - isolated_loss)
            (fit_loss + isolated_term).backward()
            if trainer.args.max_grad_norm and trainer.args.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, trainer.args.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            bar.update(1)
            if step % args.row_filter_unlearn_eval_every == 0 or step == args.row_filter_unlearn_steps:
                accuracy = guard_accuracy(trainer, model, reference_dataset)
                guard.append({"step": step, "accuracy": accuracy, "isolated_loss": float(isolated_loss.detach())})
                if accuracy >= floor:
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
