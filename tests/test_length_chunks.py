"""A classifier's forward pass in length-sorted chunks (`LengthChunked`): the same logits, loss and gradient as one
pass over the padded batch, with less padding; and the row filter's passes that run in it: the unlearning phase
(`row_filter_unlearn_chunk_rows`) and the trusted teacher's training (`row_filter_teacher_chunk_rows`)."""

from __future__ import annotations

import datasets
import pytest
import torch

from peft_musclelora.length_chunks import LengthChunked, length_chunked, trimmed_chunks
from peft_musclelora.row_filter import RowFilterArguments, run_row_filter
from peft_musclelora.trainer import MuScleLoraTrainer
from peft_musclelora.unlearning import run_unlearning

from .ga_helpers import SEQ_LEN, VOCAB, tiny_bert, token_dataset, trainable_state
from .test_row_filter import _args, _trainer
from .test_unlearning import _clean_label_rows

# Float32 sums taken over fewer padded (exactly zero-weighted) positions, in another order: rounding only.
TOLERANCE = {"atol": 1e-5, "rtol": 1e-4}


def _ragged_batch(rows: int, seed: int) -> dict[str, torch.Tensor]:
    """`rows` random rows of lengths 2..SEQ_LEN, right-padded with 0, with class labels and segment ids."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, SEQ_LEN + 1, (rows,), generator=generator)
    mask = (torch.arange(SEQ_LEN)[None, :] < lengths[:, None]).long()
    ids = torch.randint(2, 30, (rows, SEQ_LEN), generator=generator) * mask
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "token_type_ids": torch.zeros_like(ids),
        "labels": torch.randint(0, 2, (rows,), generator=generator),
    }


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}


def test_the_chunks_are_the_rows_longest_first_each_cut_after_its_last_filled_column():
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 0], [1, 0, 0, 0, 0], [1, 1, 1, 0, 0]])
    chunks = trimmed_chunks(mask, rows=2)
    assert [(chunk.tolist(), columns) for chunk, columns in chunks] == [([1, 3], 4), ([0, 2], 2)]


def test_a_hole_in_a_row_is_kept_and_only_trailing_padding_is_cut():
    # a masked-out token inside a row (the trigger masked out) must not move the tokens after it
    mask = torch.tensor([[1, 0, 1, 0], [1, 1, 0, 0]])
    assert [(chunk.tolist(), columns) for chunk, columns in trimmed_chunks(mask, rows=2)] == [([0, 1], 3)]


@pytest.mark.parametrize("rows", [1, 3, 5])
def test_chunked_logits_loss_and_gradient_are_those_of_the_padded_batch(rows):
    batch = _ragged_batch(12, seed=0)
    model = tiny_bert(seed=0)  # no dropout: train mode is then deterministic, so the two passes can be compared
    model.train()
    whole = model(**batch)
    whole.loss.backward()
    expected = _grads(model)
    model.zero_grad(set_to_none=True)
    chunked = LengthChunked(model, rows)(**batch)
    chunked.loss.backward()
    torch.testing.assert_close(chunked.logits, whole.logits, **TOLERANCE)
    torch.testing.assert_close(chunked.loss, whole.loss, **TOLERANCE)
    got = _grads(model)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], **TOLERANCE)


def test_each_chunk_reaches_the_model_with_its_own_rows_and_columns_only():
    batch = _ragged_batch(10, seed=1)
    model = tiny_bert(seed=0).eval()
    seen = []
    model.register_forward_pre_hook(lambda _, __, inputs: seen.append(inputs["input_ids"].shape[:2]), with_kwargs=True)
    LengthChunked(model, rows=4)(**batch)
    lengths = batch["attention_mask"].sum(1).sort(descending=True).values
    assert seen == [(4, int(lengths[0])), (4, int(lengths[4])), (2, int(lengths[8]))]


@pytest.mark.parametrize(
    "change",
    [
        {"labels": None},  # no labels: nothing says the logits are one row each
        {"output_hidden_states": True},  # per-position outputs of chunks cut to different lengths
        {"return_dict": False},  # a tuple, which the chunks cannot be joined into
    ],
    ids=["no labels", "hidden states", "tuple output"],
)
def test_calls_it_cannot_join_go_to_the_model_whole(change):
    batch = {key: value for key, value in {**_ragged_batch(6, seed=2), **change}.items() if value is not None}
    model = tiny_bert(seed=0).eval()
    calls = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    LengthChunked(model, rows=2)(**batch)
    assert len(calls) == 1


def test_token_level_labels_and_batches_no_larger_than_a_chunk_go_to_the_model_whole():
    model = tiny_bert(seed=0).eval()
    calls = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    LengthChunked(model, rows=6)(**_ragged_batch(6, seed=3))
    token_level = {**_ragged_batch(6, seed=3), "labels": torch.zeros(6, SEQ_LEN, dtype=torch.long)}
    with pytest.raises(ValueError):  # a classifier refuses token labels; the point is that it got them whole
        LengthChunked(model, rows=2)(**token_level)
    assert len(calls) == 2


def test_the_wrapper_switches_the_models_mode_and_reads_its_attributes():
    model = tiny_bert(seed=0).train()
    chunked = LengthChunked(model, rows=2)
    chunked.eval()
    assert not model.training and not chunked.training
    chunked.train()
    assert model.training and chunked.config is model.config


@pytest.mark.parametrize(("rows", "error"), [(0, ValueError), (True, TypeError), (2.0, TypeError)])
def test_a_chunk_must_hold_a_whole_number_of_rows(rows, error):
    with pytest.raises(error, match=f"`rows` must be an integer >= 1, got {rows!r}"):
        LengthChunked(tiny_bert(seed=0), rows)


def test_no_chunk_size_is_the_model_itself_and_a_size_wraps_it_quietly_on_a_cpu(recwarn):
    model = tiny_bert(seed=0)
    assert length_chunked(model, None, "row_filter_unlearn_chunk_rows") is model
    wrapped = length_chunked(model, 4, "row_filter_unlearn_chunk_rows")
    assert isinstance(wrapped, LengthChunked) and wrapped.model is model and wrapped.rows == 4
    assert not recwarn.list


def test_chunks_asked_for_a_model_off_the_cpu_are_run_with_a_warning_naming_the_setting():
    model = tiny_bert(seed=0).to("meta")  # any device but the CPU: chunks run one after another there
    with pytest.warns(
        UserWarning, match=r"row_filter_teacher_chunk_rows=8 .* on meta.*set row_filter_teacher_chunk_rows=None"
    ):
        wrapped = length_chunked(model, 8, "row_filter_teacher_chunk_rows")
    assert isinstance(wrapped, LengthChunked)


@pytest.mark.parametrize("field", ["row_filter_unlearn_chunk_rows", "row_filter_teacher_chunk_rows"])
@pytest.mark.parametrize(("rows", "error"), [(0, ValueError), ("8", TypeError), (1.5, TypeError)])
def test_invalid_chunk_rows_name_the_field_and_the_value(field, rows, error):
    with pytest.raises(error, match=f"`{field}` must be None or an integer >= 1, got {rows!r}"):
        RowFilterArguments(**{field: rows})


def _ragged_rows(rows: int, seed: int) -> datasets.Dataset:
    """`token_dataset` rows cut to random lengths (the label's token 1 stays first)."""
    generator = torch.Generator().manual_seed(seed)
    data = token_dataset(rows, seed=seed).to_dict()
    for row, length in enumerate(torch.randint(2, SEQ_LEN + 1, (rows,), generator=generator).tolist()):
        data["input_ids"][row] = data["input_ids"][row][:length]
        data["attention_mask"][row] = data["attention_mask"][row][:length]
    return datasets.Dataset.from_dict(data)


def _pad(rows: list[dict]) -> dict[str, torch.Tensor]:
    longest = max(len(row["input_ids"]) for row in rows)
    return {
        "input_ids": torch.tensor([row["input_ids"] + [0] * (longest - len(row["input_ids"])) for row in rows]),
        "attention_mask": torch.tensor(
            [row["attention_mask"] + [0] * (longest - len(row["attention_mask"])) for row in rows]
        ),
        "labels": torch.tensor([row["labels"] for row in rows]),
    }


def _phase(tmp_path, chunk_rows, isolated=None, **settings):
    """A tiny trainer's unlearning phase (6 steps, batches of 8) on ragged rows, the model's calls recorded."""
    trainer = _trainer(
        tmp_path,
        train=_ragged_rows(48, seed=1),
        data_collator=_pad,
        row_filter_unlearn=True,
        row_filter_unlearn_steps=6,
        row_filter_unlearn_eval_every=3,
        row_filter_unlearn_significance=None,
        row_filter_unlearn_chunk_rows=chunk_rows,
        **settings,
    )
    trainer.model.train()
    calls = []  # (train mode?, rows, columns) of each call
    handle = trainer.model.register_forward_pre_hook(
        lambda model, _, inputs: calls.append((model.training, *inputs["input_ids"].shape[:2])), with_kwargs=True
    )
    kept, isolated = _ragged_rows(64, seed=3), _ragged_rows(24, seed=4) if isolated is None else isolated
    args = trainer.row_filter_args
    report = run_unlearning(trainer, args, kept, isolated, trainer.reference_dataset, 0, False)
    handle.remove()
    return report, calls, trainable_state(trainer.model)


def test_the_unlearning_phase_runs_its_batches_in_chunks_and_the_guard_whole(tmp_path):
    report, calls, _ = _phase(tmp_path, chunk_rows=3)
    assert report["skipped"] is None and report["steps"] == 6
    # two batches of 8 a step (kept, isolated), each in chunks of 3, 3 and 2 rows
    assert [rows for training, rows, _ in calls if training] == [3, 3, 2] * 6 * 2
    # the guard (steps 0, 3, 6) scores the 40 trusted rows in batches of 16 (per_device_eval_batch_size), whole
    assert [rows for training, rows, _ in calls if not training] == [16, 16, 8] * 3


def test_a_chunk_no_smaller_than_the_batch_is_the_phase_without_chunks(tmp_path):
    whole, whole_calls, whole_state = _phase(tmp_path / "whole", chunk_rows=None)
    chunked, chunked_calls, chunked_state = _phase(tmp_path / "chunked", chunk_rows=8)
    assert chunked_calls == whole_calls and chunked["guard"] == whole["guard"]
    assert all(torch.equal(whole_state[name], chunked_state[name]) for name in whole_state)


def test_the_rows_with_the_trigger_inserted_and_their_reference_run_in_chunks_too(tmp_path):
    trigger = VOCAB - 1
    settings = {"row_filter_unlearn_target": "chance_inserted", "row_filter_unlearn_trigger_z": 4.0}
    isolated = _clean_label_rows(64, seed=7, trigger=trigger).select(range(16))  # two whole batches of 8
    report, calls, _ = _phase(tmp_path, 3, isolated, **settings)
    assert trigger in [token["id"] for token in report["trigger_tokens"]] and report["trigger_runs"]
    # kept, isolated and inserted batches with gradient, in chunks; the insertions' reference without, in chunks
    assert [rows for training, rows, _ in calls if training] == [3, 3, 2] * 6 * 3
    assert [rows for training, rows, _ in calls if not training] == [16, 16, 8] + ([3, 3, 2] * 3 + [16, 16, 8]) * 2


def _teacher(tmp_path, chunk_rows):
    """A tiny trainer's row filter with the trusted teacher (6 steps, batches of 8 ragged trusted rows); the model's
    calls recorded as (train mode?, gradient?, rows, columns)."""
    trainer = MuScleLoraTrainer(
        model=tiny_bert(seed=0, dropout=0.1),
        args=_args(
            tmp_path, row_filter_teacher_mix=0.5, row_filter_teacher_steps=6, row_filter_teacher_chunk_rows=chunk_rows
        ),
        train_dataset=_ragged_rows(48, seed=1),
        reference_dataset=_ragged_rows(40, seed=2),
        data_collator=_pad,
    )
    calls = []
    handle = trainer.model.register_forward_pre_hook(
        lambda model, _, inputs: calls.append(
            (model.training, torch.is_grad_enabled(), *inputs["input_ids"].shape[:2])
        ),
        with_kwargs=True,
    )
    report = run_row_filter(trainer, trainer.row_filter_args, trainer.reference_dataset, seed=0, progress=False)
    handle.remove()
    return report, calls


def test_the_trusted_teacher_trains_in_chunks_and_predicts_what_it_predicts_from_whole_batches(tmp_path):
    whole, whole_calls = _teacher(tmp_path / "whole", chunk_rows=None)
    chunked, chunked_calls = _teacher(tmp_path / "chunked", chunk_rows=3)
    # the teacher alone trains in eval mode with gradient: 6 batches of 8, each in chunks of 3, 3 and 2 rows
    assert [rows for training, grad, rows, _ in whole_calls if grad and not training] == [8] * 6
    assert [rows for training, grad, rows, _ in chunked_calls if grad and not training] == [3, 3, 2] * 6
    # the probes (train mode) and every scoring pass (no gradient) run as they did
    assert [call for call in chunked_calls if call[0] or not call[1]] == [
        call for call in whole_calls if call[0] or not call[1]
    ]
    # no dropout in eval mode: the same steps up to float rounding, so the same predictions and decisions
    teachers = [
        torch.tensor([row["teacher_log_probs"] for row in report["rows"]], dtype=torch.float64)
        for report in (whole, chunked)
    ]
    torch.testing.assert_close(teachers[1], teachers[0], atol=1e-4, rtol=0)
    assert [row["reason"] for row in chunked["rows"]] == [row["reason"] for row in whole["rows"]]
