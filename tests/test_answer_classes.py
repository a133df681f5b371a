"""Class distributions over a closed answer set for token-level (causal-LM) labels: the trie of the answers, the
model's class distribution on a row's own answer, and the token-level loss with a target distribution."""

from __future__ import annotations

import math

import pytest
import torch

from peft_musclelora.answer_classes import (
    answer_class_indices,
    answer_class_log_probs,
    answer_class_nll,
    branch_token_log_probs,
)
from peft_musclelora.shallow_probe import product_of_experts_token_loss, soft_cross_entropy

# Three answers that branch twice: (5, 9) leaves the others at the first token, (7, 9) and (7, 8) at the second.
TRIE = [(5, 9), (7, 8), (7, 9)]


def _labels(*answers: tuple[int, ...]) -> torch.Tensor:
    """Causal-LM labels of one-token prompts followed by `answers` (all of one length)."""
    return torch.tensor([[-100, *answer] for answer in answers])


def test_each_rows_class_is_the_index_of_its_answer_and_an_unknown_answer_is_refused_in_one_line():
    assert answer_class_indices(_labels((7, 9), (5, 9), (7, 8)), TRIE).tolist() == [2, 0, 1]
    with pytest.raises(
        ValueError, match=r"the answer \[6, 9\] of a token-level row is not among the response classes"
    ):
        answer_class_indices(_labels((6, 9)), TRIE)


def test_on_answers_that_branch_once_the_class_distribution_is_the_softmax_over_the_branching_tokens():
    logits = torch.randn(3, 3, 12, generator=torch.Generator().manual_seed(0))
    classes = [(5, 9), (7, 9)]
    log_probs = answer_class_log_probs(logits, _labels((7, 9), (5, 9), (7, 9)), classes)
    assert torch.allclose(log_probs, torch.log_softmax(logits[:, 0, [5, 7]].double(), dim=-1))


def test_a_class_that_leaves_the_answer_at_a_branch_shares_its_tokens_probability_with_those_leaving_with_it():
    logits = torch.randn(2, 3, 12, generator=torch.Generator().manual_seed(1))
    log_probs = answer_class_log_probs(logits, _labels((5, 9), (7, 8)), TRIE)
    first = torch.log_softmax(logits[:, 0, [5, 7]].double(), dim=-1)  # after the prompt: 5 or 7
    second = torch.log_softmax(logits[1, 1, [8, 9]].double(), dim=-1)  # after 7: 8 or 9
    # Row 0 answers (5, 9): below 7 the model was never shown, so (7, 8) and (7, 9) split 7's probability.
    assert torch.allclose(
        log_probs[0], torch.stack([first[0, 0], first[0, 1] - math.log(2), first[0, 1] - math.log(2)])
    )
    # Row 1 answers (7, 8): every class's probability is the product along its path.
    assert torch.allclose(log_probs[1], torch.stack([first[1, 0], first[1, 1] + second[0], first[1, 1] + second[1]]))
    assert torch.allclose(log_probs.exp().sum(dim=-1), torch.ones(2, dtype=torch.float64))


def test_the_class_distribution_gives_back_the_models_branch_probabilities_along_the_answer():
    logits = torch.randn(1, 3, 12, generator=torch.Generator().manual_seed(2))
    log_probs = answer_class_log_probs(logits, _labels((7, 9)), TRIE)
    branches = branch_token_log_probs((7, 9), TRIE, log_probs[0])
    assert [(position, tokens) for position, tokens, _ in branches] == [(0, [5, 7]), (1, [8, 9])]
    for position, tokens, log_p in branches:
        assert torch.allclose(log_p, torch.log_softmax(logits[0, position, tokens].double(), dim=-1))


def test_the_class_distribution_carries_no_gradient():
    logits = torch.zeros(1, 3, 12, requires_grad=True)
    assert not answer_class_log_probs(logits, _labels((7, 9)), TRIE).requires_grad


def test_the_answer_class_loss_is_the_own_class_entry_of_the_class_distribution_with_gradient():
    logits = torch.randn(3, 3, 12, generator=torch.Generator().manual_seed(4), requires_grad=True)
    labels = _labels((5, 9), (7, 8), (7, 9))
    nll = answer_class_nll(logits, labels, TRIE)
    own = answer_class_log_probs(logits, labels, TRIE).gather(1, answer_class_indices(labels, TRIE)[:, None])
    assert torch.allclose(nll.double(), -own.squeeze(1), atol=1e-5)
    nll.sum().backward()
    # (5, 9) chooses once, after the prompt: its end token's position gets no gradient; (7, 8) chooses twice
    assert logits.grad[0, 1].abs().sum() == 0 and logits.grad[1, 1].abs().sum() > 0
    assert set(logits.grad[0, 0].nonzero().flatten().tolist()) == {5, 7}  # only the branching tokens


def test_at_chance_among_the_answers_the_answer_class_loss_is_ln_k_whatever_the_other_tokens_score():
    logits = torch.zeros(2, 3, 12)
    logits[:, :, 3] = 5.0  # a token outside the answers, likeliest everywhere: the token loss would count it
    logits[:, 1, 9] = 8.0  # the end token after the label word: no choice there
    classes = [(5, 9), (7, 9)]
    assert torch.allclose(answer_class_nll(logits, _labels((5, 9), (7, 9)), classes), torch.full((2,), math.log(2)))


# ---- the token loss with a target distribution ----


def test_on_a_vocabulary_of_just_the_label_words_the_token_loss_with_targets_is_the_soft_cross_entropy():
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 2, 2, generator=generator)  # position 0 predicts the one-token answer at position 1
    labels = torch.tensor([[-100, 0], [-100, 1], [-100, 1], [-100, 0]])
    targets = torch.softmax(torch.randn(4, 2, generator=generator), dim=-1)
    loss = product_of_experts_token_loss(logits, labels, None, [(0,), (1,)], 0.0, targets=targets)
    assert torch.allclose(loss, soft_cross_entropy(logits[:, 0], targets), atol=1e-6)


def test_a_target_reaches_only_the_branches_of_the_answer_and_a_one_hot_target_is_the_plain_loss():
    logits = torch.randn(2, 3, 12, generator=torch.Generator().manual_seed(4), requires_grad=True)
    labels = _labels((7, 9), (5, 9))
    plain = product_of_experts_token_loss(logits, labels, None, TRIE, 0.0)
    one_hot = torch.nn.functional.one_hot(answer_class_indices(labels, TRIE), 3).float()
    assert torch.allclose(product_of_experts_token_loss(logits, labels, None, TRIE, 0.0, targets=one_hot), plain)
    assert torch.allclose(
        plain, torch.nn.functional.cross_entropy(logits[:, :2].reshape(-1, 12), labels[:, 1:].reshape(-1))
    )
    soft = torch.tensor([[0.2, 0.3, 0.5], [0.6, 0.0, 0.4]])
    loss = product_of_experts_token_loss(logits, labels, None, TRIE, 0.0, targets=soft)
    log_p = torch.log_softmax(logits, dim=-1)
    expected = (
        -(0.2 * log_p[0, 0, 5] + 0.8 * log_p[0, 0, 7])  # row 0 at the first branch: 5 against 7 (0.3 + 0.5)
        - (0.375 * log_p[0, 1, 8] + 0.625 * log_p[0, 1, 9])  # row 0 after 7: 8 against 9, renormalised
        - (0.6 * log_p[1, 0, 5] + 0.4 * log_p[1, 0, 7])  # row 1 at the first branch
        - log_p[1, 1, 9]  # row 1 after 5: no branch, its own token
    ) / 4
    assert torch.allclose(loss, expected, atol=1e-6)
    loss.backward()
    assert logits.grad is not None and bool(logits.grad[:, 2].eq(0).all())  # the last position predicts nothing


def test_a_packed_batch_is_refused_because_the_targets_need_one_distribution_per_row():
    packed = torch.tensor([[-100, 5, 1, -100, 7, 1]])  # two rows joined into one sequence
    with pytest.raises(ValueError, match=r"the trusted teacher needs one prediction per row: 2 predictions"):
        product_of_experts_token_loss(
            torch.zeros(1, 6, 12), packed, None, [(5, 1), (7, 1)], 0.0, None, torch.ones(2, 2)
        )
