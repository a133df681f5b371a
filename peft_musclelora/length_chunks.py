"""A classifier's forward pass in length-sorted chunks, each padded only to its own longest row.

A training batch of random rows is padded to its longest row: on SST-2's sentences (25 tokens on average, 66 at
most) a batch of 32 holds about twice the tokens its rows have (`benchmarks/phase_step_cost.py --chunk-rows`). On a
CPU the model's work grows with the tokens it is given, so the same rows run in a few chunks of rows of about one
length cost less; on an accelerator, where a batch's work runs in parallel, one pass over the whole batch is usually
faster. [`LengthChunked`] wraps a model so that a call on a batch of class-labelled rows does exactly that and
returns what one call would: the logits of every row in the batch's order and the batch's mean loss, the same
function of the parameters (up to float rounding and the dropout masks drawn), so the gradient is the same too.

The row filter uses it in its unlearning phase (`row_filter_unlearn_chunk_rows`), where each step runs two or three
batches forward and backward and, with the trigger inserted, a fourth forward, and in the trusted teacher's training
(`row_filter_teacher_chunk_rows`), which runs in eval mode, so there the chunks change nothing but float rounding.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, Optional

import torch
from transformers.modeling_outputs import SequenceClassifierOutput

from ._checks import check_int

__all__ = ["LengthChunked", "length_chunked", "trimmed_chunks"]


def trimmed_chunks(attention_mask: torch.Tensor, rows: int) -> list[tuple[torch.Tensor, int]]:
    """The batch's rows, longest first, in chunks of at most `rows`, each with the columns it keeps: up to its last
    column that is not padding in some row (only trailing padding is cut, so a row's positions do not move).

    Example:
        >>> mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
        >>> [(chunk.tolist(), columns) for chunk, columns in trimmed_chunks(mask, 2)]
        [([1, 0], 4), ([2], 1)]
    """
    check_int("rows", rows)
    lengths = attention_mask.sum(dim=1)
    order = torch.sort(lengths, descending=True, stable=True).indices
    chunks = []
    for chunk in order.split(rows):
        filled = attention_mask[chunk].any(dim=0).nonzero()
        chunks.append((chunk, int(filled.max()) + 1 if filled.numel() else 1))
    return chunks


class LengthChunked(torch.nn.Module):
    """`model` whose calls on a batch of class-labelled rows (1-D `labels`, an `attention_mask`) run in
    length-sorted chunks of at most `rows` rows, each cut to its own longest row ([`trimmed_chunks`]), and return a
    [`~transformers.modeling_outputs.SequenceClassifierOutput`] with every row's logits in the batch's order and the
    rows' mean of the chunks' losses (each a mean over its rows, as a classifier's loss is). Any other call (no
    labels, token-level labels, hidden states asked for, a batch no larger than `rows`) goes to `model` as it is.
    `train()` / `eval()` and attribute reads reach `model`.

    Example:
        >>> from transformers import BertConfig, BertForSequenceClassification
        >>> _ = torch.manual_seed(0)
        >>> config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        ...                     intermediate_size=32, num_labels=2)
        >>> model = BertForSequenceClassification(config).eval()
        >>> batch = {"input_ids": torch.tensor([[5, 6, 7, 0], [5, 6, 0, 0], [5, 6, 7, 8]]),
        ...          "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]),
        ...          "labels": torch.tensor([0, 1, 1])}
        >>> whole, chunked = model(**batch), LengthChunked(model, rows=2)(**batch)
        >>> [torch.allclose(whole[key], chunked[key], atol=1e-5) for key in ("logits", "loss")]
        [True, True]
    """

    def __init__(self, model: torch.nn.Module, rows: int) -> None:
        check_int("rows", rows)
        super().__init__()
        self.model, self.rows = model, rows
        self.train(model.training)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["model"], name)

    def forward(self, **inputs: Any) -> Any:
        mask, labels = inputs.get("attention_mask"), inputs.get("labels")
        whole = (
            not isinstance(mask, torch.Tensor)
            or mask.dim() != 2
            or not isinstance(labels, torch.Tensor)
            or labels.dim() != 1
            or mask.size(0) <= self.rows
            or inputs.get("output_hidden_states")
            or inputs.get("output_attentions")
            or inputs.get("return_dict") is False
        )
        if whole:
            return self.model(**inputs)
        batch, columns = mask.shape
        logits, losses = [], []
        chunks = trimmed_chunks(mask, self.rows)
        for chunk, kept in chunks:
            outputs = self.model(**_chunk_inputs(inputs, chunk, kept, batch, columns))
            if not isinstance(outputs, Mapping):
                raise TypeError(
                    f"LengthChunked needs the model to return a ModelOutput (a mapping with `logits`), got "
                    f"{type(outputs).__name__}: set `return_dict=True` in its config."
                )
            logits.append(outputs["logits"])
            losses.append(outputs["loss"] * chunk.numel() if outputs.get("loss") is not None else None)
        order = torch.cat([chunk for chunk, _ in chunks]).to(logits[0].device)
        restored = torch.empty_like(order)
        restored[order] = torch.arange(order.numel(), device=order.device)
        loss = None if any(each is None for each in losses) else torch.stack(losses).sum() / batch
        return SequenceClassifierOutput(loss=loss, logits=torch.cat(logits)[restored])


def _chunk_inputs(inputs: Mapping[str, Any], chunk: torch.Tensor, kept: int, batch: int, columns: int) -> dict:
    """The chunk's rows of every per-row tensor, cut to `kept` columns where the tensor has the batch's columns."""
    chunked = {}
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.size(0) == batch:
            value = value[chunk.to(value.device)]
            if value.dim() >= 2 and value.size(1) == columns:
                value = value[:, :kept]
        chunked[key] = value
    return chunked


def length_chunked(model: torch.nn.Module, rows: Optional[int], field_name: str) -> torch.nn.Module:
    """`model` itself when `rows` is None, else [`LengthChunked`]`(model, rows)`; `field_name` is the setting that
    asked for it, named in the warning given when the model is not on the CPU, where one pass over a padded batch
    is usually the faster (the chunks run one after another).

    Example:
        >>> from transformers import BertConfig, BertForSequenceClassification
        >>> config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        ...                     intermediate_size=32)
        >>> model = BertForSequenceClassification(config)
        >>> length_chunked(model, None, "row_filter_unlearn_chunk_rows") is model
        True
        >>> length_chunked(model, 8, "row_filter_unlearn_chunk_rows").rows
        8
    """
    if rows is None:
        return model
    parameter = next(model.parameters(), None)
    device = torch.device("cpu") if parameter is None else parameter.device
    if device.type != "cpu":
        warnings.warn(
            f"{field_name}={rows} runs each batch in length-sorted chunks, which saves time on a CPU; the model is on "
            f"{device}, where one pass over the padded batch is usually faster: set {field_name}=None there.",
            stacklevel=3,
        )
    return LengthChunked(model, rows)
