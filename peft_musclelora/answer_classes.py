"""Class distributions of token-level (causal-LM) rows whose answers form a closed set.

An instruction-tuned classifier answers each prompt with one of a few responses (its label words, each a sequence of
token ids): [`~shallow_probe.response_classes`] makes each distinct response a class. The responses form a trie: at
a position where the responses still consistent with an answer's prefix continue with more than one token, the
answer *branches*, and only there does the choice between classes happen. This module moves between a distribution
over the classes and the token distributions at the branches of one row's answer, both ways:

- [`branch_token_log_probs`]: a class distribution gives, at each branch on an answer's path, the distribution over
  the branching tokens (the classes' mass summed per token and renormalised). The shallow expert's token biases and
  the trusted teacher's soft targets on answer tokens are built from it.
- [`answer_class_log_probs`]: a causal LM's logits on the rows' own answers give each row's class distribution, as
  a model that may only answer from the set would have it: at each branch the model's probabilities of the branching
  tokens are renormalised, and a class's probability is the product along its path. A class that leaves the row's
  answer at a branch takes its token's probability there, shared equally with the other classes that leave by the
  same token (teacher forcing on the row's answer never shows the model below that branch). This is exact for answer
  sets that branch once, such as label words ([" negative", eos] and [" positive", eos]).

Both read the same trie, so the class distribution the second returns gives back, through the first, the model's
renormalised token probabilities at every branch of the row's own answer. [`answer_class_nll`] is the row's own
class's term of the second, with gradient: the loss of the choice between classes, whose chance level is ln K.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Optional

import torch


def branch_token_log_probs(
    response: Sequence[int], classes: Sequence[Sequence[int]], class_log_probs: torch.Tensor
) -> list[tuple[int, list[int], torch.Tensor]]:
    """`(position, tokens, log_p)` at each position of `response` where the classes consistent with its prefix
    continue with more than one token: the branching `tokens` (sorted) and their log-probabilities `log_p` (float64)
    under the class distribution `class_log_probs` `(classes,)`, the consistent classes' probabilities summed per
    token and renormalised.

    Example:
        >>> classes, class_probs = [(5, 9), (7, 9), (7, 8)], torch.tensor([0.5, 0.3, 0.2])
        >>> [(pos, tokens, [round(v, 3) for v in log_p.exp().tolist()])
        ...  for pos, tokens, log_p in branch_token_log_probs((7, 8), classes, class_probs.log())]
        [(0, [5, 7], [0.5, 0.5]), (1, [8, 9], [0.4, 0.6])]
    """
    response = tuple(int(token) for token in response)
    branches = []
    for position, tokens in _branches(response, classes):
        consistent = _consistent(response, classes, position)
        mass = torch.stack(
            [
                torch.logsumexp(
                    class_log_probs[[i for i in consistent if int(classes[i][position]) == token]].double(), dim=0
                )
                for token in tokens
            ]
        )
        branches.append((position, tokens, mass - torch.logsumexp(mass, dim=0)))
    return branches


def answer_tokens(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The labelled next-token positions of causal-LM `labels` `(batch, seq)` (-100: not trained): `(rows,
    positions, tokens)`, where `positions` index the logits that predict `tokens` (labels shifted by one)."""
    targets = labels[:, 1:].long()
    rows, positions = (targets != -100).nonzero(as_tuple=True)
    return rows, positions, targets[rows, positions]


def answer_class_indices(labels: torch.Tensor, classes: Sequence[Sequence[int]]) -> torch.Tensor:
    """Each row's class: the index in `classes` of its answer (the labelled tokens of `labels` `(batch, seq)`).
    Raises `ValueError` for an answer that is not a class.

    Example:
        >>> answer_class_indices(torch.tensor([[-100, -100, 7, 9], [-100, -100, 5, 9]]), [(5, 9), (7, 9)]).tolist()
        [1, 0]
    """
    index = {tuple(int(t) for t in cls): position for position, cls in enumerate(classes)}
    rows, _, tokens = answer_tokens(labels)
    found = []
    for row in range(labels.size(0)):
        answer = tuple(tokens[rows == row].tolist())
        if answer not in index:
            raise ValueError(
                f"the answer {list(answer)} of a token-level row is not among the response classes "
                f"{[list(c) for c in classes]} the row filter found in the training rows (cut short by max_length?)."
            )
        found.append(index[answer])
    return torch.tensor(found, dtype=torch.long, device=labels.device)


def answer_class_log_probs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    classes: Sequence[Sequence[int]],
    class_indices: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Each row's class log-probabilities `(batch, classes)` (float64 on the logits' device, without gradient) from a
    causal LM's `logits` `(batch, seq, vocab)` on the rows' own answers (`labels`, -100 where not trained), restricted
    to the answer set as the module docstring describes. `class_indices` `(batch,)` are the rows' classes when the
    caller already has them ([`answer_class_indices`]). The branch logits of the whole batch are gathered on the
    logits' device and copied to the host once.

    Example:
        >>> logits = torch.zeros(1, 3, 10)
        >>> logits[0, 0, 7] = math.log(3.0)  # after the one-token prompt, token 7 is three times as likely as 5
        >>> labels = torch.tensor([[-100, 7, 9]])  # the answer (7, 9)
        >>> [round(p, 3) for p in answer_class_log_probs(logits, labels, [(5, 9), (7, 9)]).exp()[0].tolist()]
        [0.25, 0.75]
    """
    if class_indices is None:
        class_indices = answer_class_indices(labels, classes)
    rows, positions, tokens = answer_tokens(labels)
    answers, answer_positions = _by_row(rows, tokens), _by_row(rows, positions)
    branches_of: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
    plan = []  # (row, answer, its branches) in the order their logits are gathered
    gather_rows, gather_positions, gather_tokens = [], [], []
    for row in range(labels.size(0)):
        answer = tuple(answers.get(row, ()))
        if answer not in branches_of:
            branches_of[answer] = _branches(answer, classes)
        plan.append((row, answer, branches_of[answer]))
        for position, branching in branches_of[answer]:
            gather_rows += [row] * len(branching)
            gather_positions += [answer_positions[row][position]] * len(branching)
            gather_tokens += branching
    index = functools.partial(torch.tensor, dtype=torch.long, device=logits.device)
    gathered = logits.detach()[index(gather_rows), index(gather_positions), index(gather_tokens)].double().cpu()
    log_probs = torch.full((labels.size(0), len(classes)), -math.inf, dtype=torch.float64)
    offset = 0
    for row, answer, branches in plan:
        along = 0.0  # log-probability of the answer's prefix so far
        for position, branching in branches:
            scores = gathered[offset : offset + len(branching)]
            offset += len(branching)
            token_log_probs = dict(zip(branching, torch.log_softmax(scores, dim=0).tolist()))
            for token in branching:
                if token != answer[position]:
                    leaving = [i for i in _consistent(answer, classes, position) if int(classes[i][position]) == token]
                    log_probs[row, leaving] = along + token_log_probs[token] - math.log(len(leaving))
            along += token_log_probs[answer[position]]
        log_probs[row, int(class_indices[row])] = along
    return log_probs.to(logits.device)


def answer_class_nll(logits: torch.Tensor, labels: torch.Tensor, classes: Sequence[Sequence[int]]) -> torch.Tensor:
    """Each row's negative log-probability of its own class `(batch,)`, float32 with gradient: the sum over the
    branches of its answer of `-log softmax(logits of the branching tokens)[its token]` ([`answer_class_log_probs`]'s
    own-class entry). Unlike the token loss it ignores the positions where the answer has no choice (an
    end-of-sequence after a label word), so a model at chance among `K` classes scores exactly ln K. Raises
    `ValueError` for an answer that is not a class.

    Example:
        >>> logits = torch.zeros(2, 3, 10)
        >>> logits[:, 1, 1] = 9.0  # the end-of-sequence token after the label word: no choice, not counted
        >>> labels = torch.tensor([[-100, 7, 1], [-100, 5, 1]])  # " positive" / " negative", then end-of-sequence
        >>> [round(v, 4) for v in answer_class_nll(logits, labels, [(5, 1), (7, 1)]).tolist()]  # chance: ln 2
        [0.6931, 0.6931]
    """
    class_indices = answer_class_indices(labels, classes).tolist()
    rows, positions, _ = answer_tokens(labels)
    answer_positions = _by_row(rows, positions)
    gather_rows, gather_positions, branch_tokens, chosen = [], [], [], []
    for row, class_index in enumerate(class_indices):
        answer = tuple(int(token) for token in classes[class_index])
        for position, branching in _branches(answer, classes):
            gather_rows.append(row)
            gather_positions.append(answer_positions[row][position])
            branch_tokens.append(branching)
            chosen.append(branching.index(answer[position]))
    width = max((len(tokens) for tokens in branch_tokens), default=1)
    index = functools.partial(torch.tensor, dtype=torch.long, device=logits.device)
    padded = index([tokens + [tokens[0]] * (width - len(tokens)) for tokens in branch_tokens]).view(-1, width)
    real = index([[1] * len(tokens) + [0] * (width - len(tokens)) for tokens in branch_tokens]).view(-1, width)
    scores = logits[index(gather_rows)[:, None], index(gather_positions)[:, None], padded].float()
    log_p = torch.log_softmax(scores.masked_fill(real == 0, -math.inf), dim=-1)
    chosen_log_p = log_p.gather(1, index(chosen).view(-1, 1)).squeeze(1)
    return torch.zeros(labels.size(0), device=logits.device).index_add(0, index(gather_rows), -chosen_log_p)


def _by_row(rows: torch.Tensor, values: torch.Tensor) -> dict[int, list[int]]:
    """`values` grouped by their `rows` (as [`answer_tokens`] gives them: row-major, so in order within a row)."""
    grouped: dict[int, list[int]] = {}
    for row, value in zip(rows.tolist(), values.tolist()):
        grouped.setdefault(row, []).append(value)
    return grouped


def _consistent(answer: Sequence[int], classes: Sequence[Sequence[int]], position: int) -> list[int]:
    """The classes that continue past `position` and agree with `answer` before it."""
    return [
        index
        for index, cls in enumerate(classes)
        if len(cls) > position and tuple(cls[:position]) == tuple(answer[:position])
    ]


def _branches(answer: Sequence[int], classes: Sequence[Sequence[int]]) -> list[tuple[int, list[int]]]:
    """`(position, tokens)` at each position of `answer` where its consistent classes continue with more than one
    token (sorted)."""
    branches = []
    for position in range(len(answer)):
        tokens = sorted({int(classes[index][position]) for index in _consistent(answer, classes, position)})
        if len(tokens) >= 2:
            branches.append((position, tokens))
    return branches
