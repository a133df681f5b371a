"""Refitting a classifier's output bias on the trusted rows (`row_filter_refit_bias`).

A product of experts trains the model to explain only what its expert does not, so the model alone absorbs the
opposite of the expert's class prior: with the n-gram expert of a poisoned set (which leans towards the target) it
ends up leaning against the target, which costs clean accuracy and lowers the false-target rate along with the
attack success rate. The trusted teacher's mixed targets move the class balance too. Both shifts are a constant per
class, so the trusted rows the defense already holds are enough to undo them: [`fit_class_offset`] is the per-class
offset of the logits that maximises the likelihood of the trusted rows' labels, and [`refit_output_bias`] adds it to
the bias of the model's output layer. Nothing else of the model changes.
"""

from __future__ import annotations

import time
from typing import Any

import torch

#: How far the logits may move from `offset` when the refitted bias is checked (float32 rounding, autocast).
SHIFT_TOLERANCE = 1e-2


def fit_class_offset(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The per-class offset `(classes,)`, the first class's fixed at 0, that maximises the likelihood of `labels`
    under `logits + offset` (convex; L-BFGS).

    Example:
        >>> logits = torch.tensor([[2.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 0.0]])
        >>> offset = fit_class_offset(logits, torch.tensor([0, 1, 1, 1]))  # the model under-predicts class 1
        >>> offset[0].item(), offset[1].item() > 0
        (0.0, True)
    """
    logits, labels = logits.detach().double(), labels.long()
    free = torch.zeros(logits.size(1) - 1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([free], lr=1.0, max_iter=200, line_search_fn="strong_wolfe")
    zero = torch.zeros(1, dtype=torch.float64)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits + torch.cat([zero, free]), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return torch.cat([zero, free.detach()])


def output_bias(
    model: torch.nn.Module, num_classes: int, field_name: str = "row_filter_refit_bias"
) -> tuple[str, torch.nn.Parameter]:
    """The name and parameter of the model's output bias: the last trainable parameter named `*.bias` with shape
    `(num_classes,)` (with peft's `modules_to_save`, the trained copy of the classifier's bias). `field_name` is the
    knob named when there is none."""
    found = [
        (name, param)
        for name, param in model.named_parameters()
        if param.requires_grad and name.endswith("bias") and tuple(param.shape) == (num_classes,)
    ]
    if not found:
        raise ValueError(
            f"`{field_name}=True` refits the output layer's bias and found no trainable parameter `*.bias` "
            f"of shape ({num_classes},): train the classifier (peft's modules_to_save) with a bias, or leave it False."
        )
    return found[-1]


def refit_output_bias(
    trainer: Any, reference_dataset: Any, field_name: str = "row_filter_refit_bias"
) -> dict[str, Any]:
    """Add [`fit_class_offset`] of the trusted rows' logits to the output bias of `trainer.model`, in place.

    The shift is checked on the trusted rows (their logits must move by the offset and nothing else); otherwise the
    bias is restored and a `ValueError` names the parameter. Errors name `field_name`, the knob that asked for it.

    Returns:
        The report stored under `bias_refit` in `row_filter.json`: `parameter`, `offset` (per class),
        `trusted_rows`, `trusted_accuracy_before` / `_after` and `seconds`.
    """
    from .row_filter import class_log_probs, per_row_values  # row_filter imports this module for fit_class_offset

    start = time.perf_counter()
    model = trainer.model
    measure = class_log_probs(field_name)
    before, labels = per_row_values(trainer, model, reference_dataset, measure)
    labels_t = torch.tensor(labels)
    offset = fit_class_offset(before, labels_t)
    name, bias = output_bias(model, before.size(1), field_name)
    with torch.no_grad():
        bias.add_(offset.to(device=bias.device, dtype=bias.dtype))
    after, _ = per_row_values(trainer, model, reference_dataset, measure)
    expected = torch.log_softmax(before + offset, dim=-1)
    if not torch.allclose(after, expected, atol=SHIFT_TOLERANCE):
        with torch.no_grad():
            bias.sub_(offset.to(device=bias.device, dtype=bias.dtype))
        raise ValueError(
            f"`{field_name}=True`: adding the offset to `{name}` did not shift the logits by it (it is not the "
            f"output layer's own bias); the bias was restored. Leave {field_name} False for this head."
        )
    return {
        "parameter": name,
        "offset": offset.tolist(),
        "trusted_rows": len(labels),
        "trusted_accuracy_before": float((before.argmax(1) == labels_t).double().mean()),
        "trusted_accuracy_after": float((after.argmax(1) == labels_t).double().mean()),
        "seconds": time.perf_counter() - start,
    }
