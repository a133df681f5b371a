"""A shallow probe for the row filter: out-of-fold n-gram logistic regression over the model's own token ids.

The fit-gap probes (a few dozen steps of the adapter itself) see the insertion backdoors, which the model learns
first, but not the paraphrase ones: a style or syntax trigger is not learned in 64 steps, so its rows are not fitted
early (docs/results.md). Those triggers are still *lexically* learnable: on the shared SST-2 sets a bag of 1-3-grams
trained on the poisoned training rows classifies 95.5 % (StyleBkd) and 95.9 % (SynBkd) of the triggered test rows
as the target, against 58.0 % and 50.5 % when trained on the unpoisoned rows (`benchmarks/shallow_probe_signal.py`).
A shallow model is the natural detector of such a shortcut (the shallow expert of DPoE, Liu et al., NAACL 2024):
trained out of fold, it fits the rows of a shortcut it saw in other rows better than any trusted clean row, exactly
the `fit-early` tail the row filter cuts.

[`ngram_probe_log_probs`] trains one such model per fold on the other folds (hashed, sublinear tf-idf 1-3-grams of
the rows' token ids, L2-regularised multinomial logistic regression fitted by L-BFGS in float64) and returns the
held-out rows' and the trusted rows' predictions. The row filter calibrates their losses against the trusted rows as
one more probe step; with `row_filter_shallow_expert` the kept rows are then trained as a product of experts with
these predictions, so what the shallow model already explains (the shortcut) teaches the adapter little.

The features are the token ids the model sees, so the probe works for any tokenizer and language, and knows nothing
the model could not know (no casing the tokenizer drops, no text).

Instruction tuning has token-level labels (a prompt and its response) but, for a classification task written as
instructions, a closed set of responses (the label words): [`response_classes`] makes each distinct response a
class, the probe predicts it from the prompt's n-grams, and [`product_of_experts_token_loss`] carries the product of
experts to the next-token loss: at each response position where the responses still consistent with the gold prefix
branch, the expert's log-probability of each branching token, centred over those tokens, is added to the model's
log-probabilities (tokens no response branches to are left alone).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional, Union

import torch

from .answer_classes import answer_tokens, branch_token_log_probs

NGRAM_ORDER = 3
HASH_BUCKETS = 1 << 20
MIN_DOCUMENT_FREQUENCY = 2
# C of `C * sum(CE) + ||W||^2 / 2`. A probe that must find a shortcut, not the task, wants few strong features: on the
# shared StyleBkd / SynBkd sets the out-of-fold AUROC of the poisoned rows rose monotonically from C = 1 (0.76 / 0.81)
# to C = 1/8 (0.85 / 0.88), the strongest of the four values measured (docs/results.md).
INVERSE_REGULARISATION = 0.125
MAX_ITERATIONS = 200
#: The most distinct responses a token-level training set may have for the probe to treat each as a class: beyond
#: that the responses are free-form and no closed answer set (the shortcut's target) exists to predict.
MAX_RESPONSE_CLASSES = 64
_HASH_MODULUS = (1 << 61) - 1


def hashed_ngrams(
    token_ids: Sequence[int], order: int = NGRAM_ORDER, buckets: int = HASH_BUCKETS, min_order: int = 1
) -> list[int]:
    """Bucket of every `min_order`..`order`-gram of `token_ids`, by an explicit polynomial hash (the same on every
    machine and Python version, unlike `hash`).

    Example:
        >>> hashed_ngrams([5, 7], order=2, buckets=1000) == hashed_ngrams([5, 7], order=2, buckets=1000)
        True
        >>> len(hashed_ngrams([5, 7, 9], order=2)), len(hashed_ngrams([5, 7, 9], order=2, min_order=2))  # + 3 unigrams
        (5, 2)
    """
    ids = [int(token) for token in token_ids]
    grams = []
    for n in range(min_order, order + 1):
        for start in range(len(ids) - n + 1):
            value = n
            for token in ids[start : start + n]:
                value = (value * 1_000_003 + token + 1) % _HASH_MODULUS
            grams.append(value % buckets)
    return grams


class NgramFeatures:
    """Sublinear tf-idf over hashed n-grams, rows L2-normalised (scikit-learn's `TfidfVectorizer(sublinear_tf=True,
    min_df=2)` on token ids). The vocabulary and idf come from the rows given to `__init__` (no labels are read).

    Example:
        >>> features = NgramFeatures([[1, 2, 3], [1, 2, 4], [9]], order=1)
        >>> matrix = features.transform([[1, 2, 3], [9]])
        >>> matrix.shape, [round(float(v), 3) for v in matrix.to_dense().norm(dim=1)]
        (torch.Size([2, 2]), [1.0, 0.0])
    """

    def __init__(
        self,
        rows: Sequence[Sequence[int]],
        order: int = NGRAM_ORDER,
        buckets: int = HASH_BUCKETS,
        min_order: int = 1,
    ):
        self.order, self.buckets, self.min_order = order, buckets, min_order
        document_frequency: dict[int, int] = {}
        for row in rows:
            for gram in set(hashed_ngrams(row, order, buckets, min_order)):
                document_frequency[gram] = document_frequency.get(gram, 0) + 1
        kept = sorted(gram for gram, count in document_frequency.items() if count >= MIN_DOCUMENT_FREQUENCY)
        self.column = {gram: column for column, gram in enumerate(kept)}
        frequencies = torch.tensor([document_frequency[gram] for gram in kept], dtype=torch.float64)
        self.idf = torch.log((1 + len(rows)) / (1 + frequencies)) + 1

    @property
    def num_features(self) -> int:
        return len(self.column)

    def transform(self, rows: Sequence[Sequence[int]]) -> torch.Tensor:
        """A sparse (COO, coalesced) `(len(rows), num_features)` float64 matrix; a row with no known n-gram is all
        zeros."""
        row_index, columns, values = [], [], []
        for position, row in enumerate(rows):
            counts: dict[int, int] = {}
            for gram in hashed_ngrams(row, self.order, self.buckets, self.min_order):
                column = self.column.get(gram)
                if column is not None:
                    counts[column] = counts.get(column, 0) + 1
            keys = sorted(counts)
            if keys:
                weights = torch.tensor([1.0 + math.log(counts[k]) for k in keys], dtype=torch.float64)
                weights = weights * self.idf[keys]
                row_index.extend([position] * len(keys))
                columns.extend(keys)
                values.extend((weights / weights.norm()).tolist())
        return torch.sparse_coo_tensor(
            torch.tensor([row_index, columns], dtype=torch.int64).view(2, -1),
            torch.tensor(values, dtype=torch.float64),
            size=(len(rows), self.num_features),
            check_invariants=True,
        ).coalesce()


def fit_logistic(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    inverse_regularisation: float = INVERSE_REGULARISATION,
    offsets: Optional[torch.Tensor] = None,
    fit_bias: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(weight, bias)` of a multinomial logistic regression minimising `C * sum(CE) + ||weight||^2 / 2` (C =
    `inverse_regularisation`, bias unpenalised), by full-batch L-BFGS with a strong-Wolfe line search; deterministic
    on one machine. With `offsets` `(rows, classes)`, each row's logits are `x @ weight + bias + offset`: the model
    fits what the offsets leave unexplained. With `fit_bias=False` the bias stays 0.

    Example:
        >>> x = torch.eye(4, dtype=torch.float64).to_sparse()
        >>> weight, bias = fit_logistic(x, torch.tensor([0, 0, 1, 1]), 2)
        >>> (x @ weight + bias).argmax(1).tolist()
        [0, 0, 1, 1]
    """
    weight = torch.zeros(features.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=fit_bias)
    optimizer = torch.optim.LBFGS(
        [weight, bias] if fit_bias else [weight],
        lr=1.0,
        max_iter=MAX_ITERATIONS,
        tolerance_grad=1e-6,
        line_search_fn="strong_wolfe",
    )
    target = labels.long()

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        logits = features @ weight + bias
        if offsets is not None:
            logits = logits + offsets
        loss = inverse_regularisation * torch.nn.functional.cross_entropy(logits, target, reduction="sum")
        loss = loss + 0.5 * (weight * weight).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach()


def logistic_log_probs(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Per-row log-probabilities `(rows, classes)` of the fitted model (float64)."""
    with torch.no_grad():
        return torch.log_softmax(features @ weight + bias, dim=-1)


def ngram_probe_log_probs(
    train_rows: Sequence[Sequence[int]],
    train_labels: Sequence[int],
    train_folds: Sequence[int],
    reference_rows: Sequence[Sequence[int]],
    reference_labels: Sequence[int],
    folds: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Out-of-fold log-probabilities of the n-gram probe: `(train (rows, classes), reference (folds, refs,
    classes))`.

    For each fold a model is fitted on the training rows of the other folds; it predicts that fold's rows and every
    trusted row. So a training row's prediction comes from a model that never saw the row's label. The vocabulary
    and idf are those of all training rows (token ids only: no label is read).

    Example:
        >>> rows = [[1, 7 + i % 5] for i in range(20)] + [[2, 7 + i % 5] for i in range(20)]  # 1 -> 1, 2 -> 0
        >>> labels, folds = [1] * 20 + [0] * 20, [i % 2 for i in range(40)]
        >>> train, ref = ngram_probe_log_probs(rows, labels, folds, [[1, 5], [2, 5]], [1, 0], 2)
        >>> train.shape, ref.shape, train[:20].argmax(1).tolist() == [1] * 20, ref[:, 1].argmax(-1).tolist()
        (torch.Size([40, 2]), torch.Size([2, 2, 2]), True, [0, 0])
    """
    features = NgramFeatures(train_rows)
    train_x, reference_x = features.transform(train_rows), features.transform(reference_rows)
    train_y, reference_y = torch.tensor(list(train_labels)), torch.tensor(list(reference_labels))
    num_classes = int(max(train_y.max(), reference_y.max())) + 1
    fold_of = torch.tensor(list(train_folds))
    train_log_probs = torch.zeros(len(train_rows), num_classes, dtype=torch.float64)
    reference_log_probs = torch.zeros(folds, len(reference_rows), num_classes, dtype=torch.float64)
    for fold in range(folds):
        held_out = (fold_of == fold).nonzero().flatten()
        fit_rows = (fold_of != fold).nonzero().flatten()
        weight, bias = fit_logistic(train_x.index_select(0, fit_rows), train_y[fit_rows], num_classes)
        train_log_probs[held_out] = logistic_log_probs(train_x.index_select(0, held_out), weight, bias)
        reference_log_probs[fold] = logistic_log_probs(reference_x, weight, bias)
    return train_log_probs, reference_log_probs


def residual_log_probs(
    features: torch.Tensor,
    labels: Sequence[int],
    folds_of_rows: Sequence[int],
    offsets: torch.Tensor,
    folds: int,
    inverse_regularisation: float,
) -> torch.Tensor:
    """Out-of-fold log-probabilities `(rows, classes)` of a logistic regression over `features` (sparse or dense,
    `(rows, features)`) fitted on what `offsets` (another model's class log-probabilities of each row) leave
    unexplained: for each fold, a model whose logits are `x @ weight + offset` is fitted on the other folds, and the
    fold's rows are predicted by `x @ weight` alone. When the offsets know the task (a model of trusted rows), the
    weights go to what the labels say beyond it, such as a trigger that relabelled rows share, rather than to the
    task itself. The model has no bias: the class balance is the offsets' (a bias would be a class prior, which a
    product of experts turns against its class).

    Example:
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 1.0]] * 20, dtype=torch.float64)  # feature 0: a trigger
        >>> labels = [1] * 40  # every row labelled 1; the offsets say 1 only where the trigger is absent
        >>> offsets = torch.log_softmax(torch.tensor([[2.0, -2.0], [-2.0, 2.0]] * 20, dtype=torch.float64), -1)
        >>> folds = [(row // 2) % 2 for row in range(40)]
        >>> residual = residual_log_probs(x, labels, folds, offsets, 2, 1.0).exp()[:, 1]
        >>> round(float(residual[0]), 2), round(float(residual[1]), 2)  # the trigger explains its rows' label
        (0.99, 0.57)
    """
    labels_t = torch.tensor(list(labels))
    offsets = torch.as_tensor(offsets, dtype=torch.float64)
    fold_of = torch.tensor(list(folds_of_rows))
    log_probs = torch.zeros(features.shape[0], offsets.shape[1], dtype=torch.float64)
    for fold in range(folds):
        held_out = (fold_of == fold).nonzero().flatten()
        fit_rows = (fold_of != fold).nonzero().flatten()
        weight, bias = fit_logistic(
            features.index_select(0, fit_rows),
            labels_t[fit_rows],
            offsets.shape[1],
            inverse_regularisation,
            offsets[fit_rows],
            fit_bias=False,
        )
        log_probs[held_out] = logistic_log_probs(features.index_select(0, held_out), weight, bias)
    return log_probs


def standardised(features: torch.Tensor) -> torch.Tensor:
    """Dense `features` with each column shifted to mean 0 and scaled to standard deviation 1 over the rows (a
    constant column stays 0), so one L2 penalty weighs every feature alike."""
    features = features.double()
    return (features - features.mean(dim=0)) / features.std(dim=0).clamp_min(1e-12)


def expert_gradient_scale(log_probs: torch.Tensor, label_log_probs: torch.Tensor, weight: float) -> torch.Tensor:
    """Per row, `1 - p(label)` under the sharpened shallow expert alone, `p ∝ p_shallow ** weight`: how much of a
    gradient the row gives a model still at chance (uniform logits) under the product-of-experts loss
    `CE(log_softmax(logits) + weight * log p_shallow)` (the loss's gradient in the logits is `p - onehot(label)`).
    0: the shallow expert explains the row and it teaches the model nothing; `1 - 1/K` or more: the expert is at
    chance or wrong and the row teaches as much as without it.

    `log_probs` are the shallow expert's `(rows, classes)` log-probabilities, `label_log_probs` those of each row's
    label.

    Example:
        >>> log_probs = torch.log(torch.tensor([[0.2, 0.8], [0.5, 0.5]]))
        >>> expert_gradient_scale(log_probs, log_probs[:, 1], 1.0).tolist()
        [0.19999998807907104, 0.5]
        >>> [round(value, 4) for value in expert_gradient_scale(log_probs, log_probs[:, 1], 4.0).tolist()]
        [0.0039, 0.5]
    """
    sharpened = weight * log_probs
    return 1.0 - torch.exp(weight * label_log_probs - torch.logsumexp(sharpened, dim=-1))


def response_classes(responses: Sequence[Sequence[int]]) -> list[tuple[int, ...]]:
    """The distinct responses (token-id sequences) of token-level rows, sorted: the classes the shallow probe
    predicts. Raises `ValueError` unless they are a closed set: 2 to [`MAX_RESPONSE_CLASSES`] of them, each row's
    response shared with another row on average (at most half as many responses as rows), none empty or a prefix of
    another (a response cut short by truncation).

    Example:
        >>> response_classes([[7, 2], [5, 2], [7, 2], [5, 2]])
        [(5, 2), (7, 2)]
    """
    classes = sorted({tuple(int(token) for token in response) for response in responses})
    for shorter, longer in zip(classes, classes[1:]):  # sorted: a prefix sorts right before a class it begins
        if longer[: len(shorter)] == shorter:
            raise ValueError(
                f"the row filter's answer classes (row_filter_shallow_probe, row_filter_teacher_mix): the response "
                f"{list(shorter)} is a prefix of the response {list(longer)} "
                "(empty or cut short: raise max_length, or end every response with the end-of-sequence token), so "
                "no token tells them apart."
            )
    most = min(MAX_RESPONSE_CLASSES, len(responses) // 2)
    if not 2 <= len(classes) <= most:
        raise ValueError(
            "row_filter_shallow_probe and row_filter_teacher_mix on token-level labels predict each row's response "
            "from a closed set "
            f"(2 to {MAX_RESPONSE_CLASSES} distinct responses, at most half as many as rows); these {len(responses)} "
            f"rows have {len(classes)} distinct responses (with TRL, set completion_only_loss so only the answer is "
            "labelled)."
        )
    return classes


def branch_token_biases(
    response: Sequence[int], classes: Sequence[Sequence[int]], class_log_probs: torch.Tensor, weight: float
) -> list[tuple[int, list[int], torch.Tensor]]:
    """Where and how the shallow expert acts on one response: `(position, tokens, biases)` at each position of
    `response` where the classes consistent with its prefix continue with more than one token. A token's bias is
    `weight * log p_shallow(token | prefix)` (the consistent classes' probabilities summed per token and
    renormalised), centred over the branching tokens, so an expert at chance adds nothing.

    Example:
        >>> classes = [(5, 9), (7, 9)]  # " negative" / " positive" then end-of-sequence
        >>> [(pos, tokens, [round(v, 3) for v in bias.tolist()])
        ...  for pos, tokens, bias in branch_token_biases((7, 9), classes, torch.log(torch.tensor([0.2, 0.8])), 1.0)]
        [(0, [5, 7], [-0.693, 0.693])]
    """
    return [
        (position, tokens, weight * (log_p - log_p.mean()))
        for position, tokens, log_p in branch_token_log_probs(response, classes, class_log_probs)
    ]


def product_of_experts_token_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    class_log_probs: Optional[torch.Tensor],
    classes: Sequence[Sequence[int]],
    weight: float,
    num_items_in_batch: Optional[int] = None,
    targets: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Next-token cross-entropy of causal-LM `logits` `(batch, seq, vocab)` against `labels` `(batch, seq)` (-100:
    not trained), with the shallow expert's [`branch_token_biases`] added to the logits at each row's branching
    positions: the token-level form of `CE(log_softmax(logits) + weight * log p_shallow)`. Summed over the labelled
    tokens and divided by `num_items_in_batch` (their count in the whole accumulated batch) or, when None, by their
    count here. `class_log_probs` `(batch, classes)`: each row's out-of-fold probe prediction (None: no expert, the
    model's own logits). `targets` `(batch, classes)`, a distribution over the classes per row ([`mixed_targets`]),
    replaces the one-hot answer at each branch of the row's answer by its [`~answer_classes.branch_token_log_probs`]
    (the answer's own tokens elsewhere): the token-level form of `soft_cross_entropy(..., targets)`.

    Example:
        >>> logits = torch.zeros(1, 3, 10)
        >>> labels = torch.tensor([[-100, 7, 9]])  # the response (7, 9) after a one-token prompt
        >>> plain = product_of_experts_token_loss(logits, labels, torch.zeros(1, 2), [(5, 9), (7, 9)], 0.0)
        >>> confident = product_of_experts_token_loss(
        ...     logits, labels, torch.log(torch.tensor([[0.01, 0.99]])), [(5, 9), (7, 9)], 4.0
        ... )
        >>> round(float(plain), 4) == round(float(torch.log(torch.tensor(10.0))), 4), bool(confident < plain)
        (True, True)
    """
    for name, per_row in (("the shallow expert", class_log_probs), ("the trusted teacher", targets)):
        if per_row is not None and per_row.size(0) != labels.size(0):
            raise ValueError(
                f"{name} needs one prediction per row: {per_row.size(0)} predictions for a batch of {labels.size(0)} "
                "label rows (padding-free or packed batches join rows; they are not supported with "
                "row_filter_shallow_expert or row_filter_teacher_mix)."
            )
    rows, positions, answer = answer_tokens(labels)
    # (labelled tokens, vocab) in float32: a copy, so the biases never touch the model's logits, and only of the
    # labelled positions, so a large vocabulary is not upcast at every position.
    selected = logits[rows, positions].float()
    if class_log_probs is not None:
        class_log_probs = class_log_probs.detach().double().cpu()  # read row by row: one transfer, not one per row
    if targets is not None:
        targets = targets.detach().double().cpu().clamp_min(0).log()
    bias_rows, bias_tokens, bias_values = [], [], []
    soft_rows, soft_tokens, soft_weights = [], [], []  # target minus one-hot at each branch of each answer
    for row in range(labels.size(0)):
        entries = (rows == row).nonzero().flatten().tolist()  # this row's labelled tokens, in order
        response = answer[entries].tolist()
        if class_log_probs is not None:
            for position, tokens, biases in branch_token_biases(response, classes, class_log_probs[row], weight):
                bias_rows.extend([entries[position]] * len(tokens))
                bias_tokens.extend(tokens)
                bias_values.append(biases)
        if targets is not None:
            for position, tokens, log_p in branch_token_log_probs(response, classes, targets[row]):
                soft_rows.extend([entries[position]] * len(tokens))
                soft_tokens.extend(tokens)
                soft_weights.extend((p - float(t == response[position])) for t, p in zip(tokens, log_p.exp().tolist()))
    if bias_rows:
        selected = selected.index_put(
            (torch.tensor(bias_rows, device=selected.device), torch.tensor(bias_tokens, device=selected.device)),
            torch.cat(bias_values).to(selected),
            accumulate=True,
        )
    loss = torch.nn.functional.cross_entropy(selected, answer, reduction="sum")
    if soft_rows:
        # -sum_t q_t log p_t = -log p_answer - sum_t (q_t - onehot_t) log p_t at a branch: the hard loss plus these.
        log_probs = torch.log_softmax(selected, dim=-1)
        at = (torch.tensor(soft_rows, device=selected.device), torch.tensor(soft_tokens, device=selected.device))
        loss = loss - (torch.tensor(soft_weights, device=selected.device, dtype=selected.dtype) * log_probs[at]).sum()
    if num_items_in_batch is None:
        return loss / max(answer.numel(), 1)
    count = torch.as_tensor(num_items_in_batch, device=loss.device)
    # DataParallel hands each replica its share as an (n_gpu,) tensor: this device's rows are the whole batch here.
    return loss / count.sum().clamp(min=1)


def balanced_log_probs(log_probs: torch.Tensor, class_prior: torch.Tensor) -> torch.Tensor:
    """The shallow expert divided by its class prior and renormalised: `log_softmax(log p_shallow - log prior)`.

    A weight above 1 sharpens whatever the expert says, its class prior included: at weight 6 an expert that gives
    the target 57 % of the training rows (the poisoned sets' share) leans 1.6 nats towards it on every row, so the
    rows of the target class give the model far less gradient than the others and the model alone ends up biased
    against the target. Divided by its prior (`class_prior`, its mean prediction over the training rows), the
    expert is at chance on a row with no evidence either way, and the weight sharpens only what it sees in the row.

    Example:
        >>> log_probs = torch.log(torch.tensor([[0.4, 0.6], [0.2, 0.8]]))
        >>> balanced = balanced_log_probs(log_probs, torch.tensor([0.4, 0.6]))
        >>> [round(p, 3) for p in balanced.exp()[:, 1].tolist()]
        [0.5, 0.727]
    """
    return torch.log_softmax(log_probs - class_prior.to(log_probs).log(), dim=-1)


def label_doubt(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row, `1 - p(label)` with `p = softmax(scores)`, in float64 and without gradient: the doubt a model
    (its logits) or a fixed predictor (its log-probabilities) has about each row's label. It is the gate
    `"teacher_doubt"` of `row_filter_shallow_expert_gate` (on the trusted teacher's log-probabilities) and
    `"model_doubt"` of `row_filter_teacher_mix_gate` (on the logits of the model being trained).

    Example:
        >>> teacher = torch.log(torch.tensor([[0.9, 0.1], [0.9, 0.1]]))
        >>> [round(g, 3) for g in label_doubt(teacher, torch.tensor([0, 1])).tolist()]
        [0.1, 0.9]
        >>> [round(v, 3) for v in label_doubt(torch.tensor([[0.0, 0.0], [2.0, 0.0]]), torch.tensor([1, 0])).tolist()]
        [0.5, 0.119]
    """
    probs = torch.softmax(scores.detach().double(), dim=-1)
    return 1.0 - probs.gather(1, labels.long().to(probs.device)[:, None])[:, 0]


def gated_log_probs(log_probs: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """The shallow expert tempered row by row, `gate * log p_shallow` (`(rows, classes)`): under the product of
    experts a row with gate 0 trains on the model's own cross-entropy and a row with gate 1 on the whole expert.

    The expert's class-prior sharpening pushes the model alone against the target on every row it is applied to,
    the rows of the other class that a trusted model reads correctly included; gated by the teacher's doubt it
    acts where the label is in question (a relabelled row) and leaves the rows the teacher confirms to train as
    without it.

    Example:
        >>> log_probs = torch.log(torch.tensor([[0.2, 0.8], [0.2, 0.8]]))
        >>> gated = gated_log_probs(log_probs, torch.tensor([0.0, 1.0]))
        >>> [round(v, 3) for v in torch.log_softmax(gated, dim=-1).exp()[:, 1].tolist()]
        [0.5, 0.8]
    """
    return log_probs * gate.to(log_probs)[:, None]


EXPERT_GATES = {"teacher_doubt": label_doubt}


def mixed_targets(
    labels: torch.Tensor, teacher_log_probs: torch.Tensor, mix: Union[float, torch.Tensor]
) -> torch.Tensor:
    """Per row, the training target `(1 - mix) * onehot(label) + mix * p_teacher` `(batch, classes)`, float32 on
    the labels' device (`row_filter_teacher_mix`); `mix` is one share for every row or one per row `(batch,)`.

    Example:
        >>> teacher = torch.log(torch.tensor([[0.8, 0.2], [0.5, 0.5]]))
        >>> mixed_targets(torch.tensor([1, 0]), teacher, 0.5).tolist()
        [[0.4000000059604645, 0.6000000238418579], [0.75, 0.25]]
        >>> mixed_targets(torch.tensor([1, 0]), teacher, torch.tensor([0.5, 0.0])).tolist()
        [[0.4000000059604645, 0.6000000238418579], [1.0, 0.0]]
    """
    teacher = teacher_log_probs.to(device=labels.device, dtype=torch.float32).exp()
    one_hot = torch.nn.functional.one_hot(labels.long(), teacher.size(-1)).float()
    share = torch.as_tensor(mix, dtype=torch.float32, device=labels.device).reshape(-1, 1)
    return (1.0 - share) * one_hot + share * teacher


def model_contradiction(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row, 1 where the model's own most likely class (from `logits` `(batch, classes)`) is not the row's label
    and 0 where it is (`row_filter_teacher_mix_gate="model_contradicts"`): the teacher pulls only the rows the model
    does not yet predict correctly.

    Example:
        >>> model_contradiction(torch.tensor([[0.0, 1.0], [2.0, 0.0]]), torch.tensor([1, 1])).tolist()
        [0.0, 1.0]
    """
    return (logits.detach().argmax(dim=-1) != labels).float()


TEACHER_MIX_GATES = {"model_doubt": label_doubt, "model_contradicts": model_contradiction}


def shallow_support(shallow_log_probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row, 1 where the shallow probe's most likely class (out of fold, `(rows, classes)`) is the row's label and
    0 where it is not (`row_filter_teacher_row_gate="shallow_supports"`). A relabelled row's label is carried by its
    surface, the trigger's n-grams the shallow probe learns from the poisoned rows, and contradicted by its content;
    a clean row whose label not even its n-grams support is a hard row, where a teacher trained on a few hundred rows
    is as likely wrong as the label.

    Example:
        >>> shallow_support(torch.log(torch.tensor([[0.3, 0.7], [0.8, 0.2]])), torch.tensor([1, 1])).tolist()
        [1.0, 0.0]
    """
    return (shallow_log_probs.argmax(dim=-1) == labels.to(shallow_log_probs.device)).float()


#: The static per-row gates of `row_filter_teacher_row_gate`: `(shallow_log_probs, labels) -> (rows,)` in [0, 1].
TEACHER_ROW_GATES = {"shallow_supports": shallow_support}


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """`-sum_c target_c * log_softmax(logits)_c` per row, averaged over the batch (`reduction="none"`: per row).

    Example:
        >>> round(float(soft_cross_entropy(torch.zeros(1, 2), torch.tensor([[0.3, 0.7]]))), 4)  # ln 2
        0.6931
    """
    losses = -(targets.to(logits.device) * torch.log_softmax(logits.float(), dim=-1)).sum(dim=-1)
    return losses.mean() if reduction == "mean" else losses


def _product_scores(logits: torch.Tensor, prior: torch.Tensor, weight: float) -> torch.Tensor:
    """The product of experts' unnormalised log-probabilities, `log_softmax(logits) + weight * prior`, in float32."""
    return torch.log_softmax(logits.float(), dim=-1) + weight * prior.to(device=logits.device, dtype=torch.float32)


def product_of_experts_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    prior: torch.Tensor,
    weight: float,
    targets: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """`CE(log_softmax(logits) + weight * prior)`, the mean over the batch: the model learns only what the fixed
    shallow expert (`prior`, its `(batch, classes)` log-probabilities) does not explain, and where the expert
    contradicts a row's label the model must outweigh `weight` times the expert's confidence. `targets` `(batch,
    classes)` replaces the one-hot labels by a distribution ([`mixed_targets`]).

    Example:
        >>> logits, labels = torch.zeros(2, 2), torch.tensor([1, 1])
        >>> prior = torch.log(torch.tensor([[0.1, 0.9], [0.9, 0.1]]))
        >>> round(float(product_of_experts_loss(logits, labels, prior, 1.0)), 4)  # (-ln 0.9 - ln 0.1) / 2
        1.204
    """
    combined = _product_scores(logits, prior, weight)
    if targets is not None:
        return soft_cross_entropy(combined, targets)
    return torch.nn.functional.cross_entropy(combined, labels.long())


def shallow_row_weights(prior: torch.Tensor, labels: torch.Tensor, weight: float) -> torch.Tensor:
    """Per row, the share of its loss that [`reweighted_loss`] keeps: `1 - p(label)` under the sharpened shallow
    expert (`p ∝ exp(weight * prior)`, [`expert_gradient_scale`]) divided by its value at chance, `1 - 1/K`, and
    capped at 1. A row the expert explains confidently weighs about 0; a row it is unsure of, or gets wrong, weighs
    1, as in plain training, never more.

    Example:
        >>> prior = torch.log(torch.tensor([[0.1, 0.9], [0.5, 0.5], [0.9, 0.1]]))
        >>> [round(w, 3) for w in shallow_row_weights(prior, torch.tensor([1, 1, 1]), 2.0).tolist()]
        [0.024, 1.0, 1.0]
    """
    prior = prior.float()
    label_log_probs = prior.gather(1, labels.long()[:, None].to(prior.device))[:, 0]
    chance = 1.0 - 1.0 / prior.size(1)
    return (expert_gradient_scale(prior, label_log_probs, weight) / chance).clamp(max=1.0)


def reweighted_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    prior: torch.Tensor,
    weight: float,
    targets: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The cross-entropy of the model alone, each row weighted by [`shallow_row_weights`] and averaged over the
    batch: the rows the shallow expert explains (a lexical shortcut) teach the model little, as under the product
    of experts, but no row is amplified and the model's own logits are never offset by the expert's, so the model
    learns no correction against the words the expert leans on (the example reweighting of Clark et al., EMNLP 2019,
    with the expert sharpened by `weight`). `targets` `(batch, classes)` replaces the one-hot labels in the
    cross-entropy ([`mixed_targets`]); the weights still read the labels.

    Example:
        >>> logits, labels = torch.zeros(2, 2), torch.tensor([1, 1])
        >>> prior = torch.log(torch.tensor([[0.1, 0.9], [0.9, 0.1]]))
        >>> round(float(reweighted_loss(logits, labels, prior, 1.0)), 4)  # (0.2 * ln 2 + 1 * ln 2) / 2
        0.4159
    """
    weights = shallow_row_weights(prior, labels, weight).to(logits.device)
    if targets is not None:
        losses = soft_cross_entropy(logits, targets, reduction="none")
    else:
        losses = torch.nn.functional.cross_entropy(logits.float(), labels.long(), reduction="none")
    return (weights * losses).mean()


#: The exponent of the generalised cross-entropy: Zhang & Sabuncu's (NeurIPS 2018) default, between the
#: cross-entropy (q -> 0) and the mean absolute error (q = 1).
GCE_EXPONENT = 0.7


def generalised_cross_entropy(log_probs: torch.Tensor, targets: torch.Tensor, q: float = GCE_EXPONENT) -> torch.Tensor:
    """`sum_c target_c * (1 - p_c ** q) / q` per row, averaged over the batch, with `p = exp(log_probs)`
    (normalised log-probabilities `(batch, classes)`). Its gradient is the cross-entropy's times `p_label ** q`,
    so a row the model contradicts confidently (a relabelled row, once the clean mapping is learned) pulls little:
    the noise-robust loss of Zhang & Sabuncu (NeurIPS 2018).

    Example:
        >>> log_probs = torch.log(torch.tensor([[0.5, 0.5], [0.9, 0.1]]))
        >>> [round(float(generalised_cross_entropy(log_probs[i:i + 1], torch.tensor([[0.0, 1.0]]), 1.0)), 4)
        ...  for i in range(2)]  # q = 1: 1 - p_label
        [0.5, 0.9]
    """
    powered = torch.exp(q * log_probs.float())
    return ((targets.to(powered) * (1.0 - powered)).sum(dim=-1) / q).mean()


def product_of_experts_gce_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    prior: torch.Tensor,
    weight: float,
    targets: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """[`generalised_cross_entropy`] of the product of experts' distribution (`softmax(log_softmax(logits) + weight
    * prior)`, as in [`product_of_experts_loss`]): the model learns what the shallow expert does not explain, and a
    row whose label the product contradicts confidently teaches little. `targets` `(batch, classes)` replaces the
    one-hot labels by a distribution ([`mixed_targets`]).

    Example:
        >>> logits, labels = torch.zeros(2, 2), torch.tensor([1, 1])
        >>> prior = torch.log(torch.tensor([[0.1, 0.9], [0.9, 0.1]]))
        >>> round(float(product_of_experts_gce_loss(logits, labels, prior, 1.0)), 4)  # (2 - .9**.7 - .1**.7) / 1.4
        0.6226
    """
    combined = _product_scores(logits, prior, weight)
    if targets is None:
        targets = torch.nn.functional.one_hot(labels.long().to(logits.device), logits.size(-1)).float()
    return generalised_cross_entropy(torch.log_softmax(combined, dim=-1), targets)


#: How the kept rows train with the shallow expert (`row_filter_shallow_expert_loss`): each takes the model's
#: `(batch, classes)` logits, the labels, the expert's log-probabilities, its weight and optional soft targets
#: `(batch, classes)`, and returns the batch loss.
SHALLOW_EXPERT_LOSSES = {
    "product": product_of_experts_loss,
    "product-gce": product_of_experts_gce_loss,
    "reweight": reweighted_loss,
}

SHALLOW_PROBES = {"ngram": ngram_probe_log_probs}
