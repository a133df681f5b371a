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
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Mapping
from typing import Any, Optional

import torch
from tqdm.auto import tqdm

from .row_filter import RowFilterArguments, _loader, length_order, subset_rows

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
        nothing was trained, or None), `cap`, `learning_rate`, `steps`, the `guard` trajectory (step, trusted
        accuracy, isolated rows' mean loss of the batch), `chosen_step`, `guard_start` / `guard_end` and `seconds`.
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
    if report["skipped"] is not None:
        return {**report, "guard": [], "chosen_step": 0, "guard_start": None, "guard_end": None, "seconds": 0.0}
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
                outputs = model(**trainer._prepare_inputs(next(isolated_batches)))
            if cap is None:
                cap = _default_cap(outputs.logits)
            isolated_loss = outputs.loss.float()
            (fit_loss + torch.relu(cap - isolated_loss)).backward()
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
