"""How good a teacher can the 400 trusted rows give? (session 24; poison flags read for the report only)

The recommended defense's trusted teacher is the adapter trained on the trusted rows (`row_filter_teacher_steps`
AdamW steps); on the full SST-2 it predicts the label of 81 % of the clean training rows. Two other teachers from the
same 400 rows, with the pretrained MiniLM sentence encoder the benchmark fine-tunes:

* `embedding-lr`: a logistic regression on the frozen encoder's mean-pooled, normalised embeddings;
* `setfit`: the encoder first fine-tuned contrastively on pairs of trusted rows (cosine similarity 1 for a pair of
  the same label, 0 otherwise; Tunstall et al. 2022, SetFit), then the same logistic regression.

For each, the share of clean and of poisoned training rows whose label it predicts (a good teacher agrees with the
clean rows and disagrees with the relabelled ones), and its accuracy on the held-out dev rows and on the clean test
set. With `--cell`, the same shares for the cell's own trusted teacher (its saved `teacher_log_probs`). The trusted
rows are the ones `reference_split_size=400` takes out of the dev file at `--seed`.

    python benchmarks/teacher_quality_screen.py --data ../shared/data/sst-2/poison/stylebkd --seed 3 \
        --cell runs-v6/s19-gated-stylebkd-s3/cells/stylebkd/fit-gap-unlearn/seed3 --setfit-steps 200
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer

from peft_musclelora.benchmark.builders import default_model_dir
from peft_musclelora.benchmark.data import load_records
from peft_musclelora.shallow_probe import fit_logistic
from peft_musclelora.trainer import reference_split_indices

TRUSTED_ROWS = 400


class Encoder:
    """The pretrained sentence encoder: mean-pooled, L2-normalised embeddings, trainable for the SetFit phase."""

    def __init__(self, path: str, max_length: int = 64) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path)
        self.max_length = max_length

    def __call__(self, texts: list[str]) -> torch.Tensor:
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        hidden = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"][..., None].float()
        return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)

    @torch.no_grad()
    def embed(self, texts: list[str], batch_size: int = 128) -> torch.Tensor:
        self.model.eval()
        return torch.cat([self(texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)]).double()

    def train_contrastive(self, texts: list[str], labels: np.ndarray, steps: int, lr: float, seed: int) -> None:
        """SetFit's body phase: pairs drawn half of one label, half of two, regressed onto cosine 1 / 0."""
        rng = random.Random(seed)
        torch.manual_seed(seed)
        by_label = {int(label): np.flatnonzero(labels == label).tolist() for label in np.unique(labels)}
        others = {key: [j for other, rows in by_label.items() if other != key for j in rows] for key in by_label}
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=lr)
        self.model.train()
        for _ in range(steps):
            first, second, target = [], [], []
            for _ in range(16):
                i = rng.randrange(len(texts))
                same = rng.random() < 0.5
                pool = by_label[int(labels[i])] if same else others[int(labels[i])]
                first.append(texts[i])
                second.append(texts[rng.choice(pool)])
                target.append(float(same))
            cosine = (self(first) * self(second)).sum(-1)
            loss = torch.nn.functional.mse_loss(cosine, torch.tensor(target))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


def _report(name: str, predicted: np.ndarray, train_labels: np.ndarray, poisoned: np.ndarray, **accuracies) -> None:
    clean = np.mean(predicted[~poisoned] == train_labels[~poisoned])
    dirty = np.mean(predicted[poisoned] == train_labels[poisoned])
    extra = "".join(f", {key.replace('_', ' ')} {value:.3f}" for key, value in accuracies.items())
    print(f"{name:32s} predicts the label of clean rows {clean:.3f}, of poisoned rows {dirty:.3f}{extra}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="an attack's folder (train-mixed-0.1.csv, ...)")
    parser.add_argument("--seed", type=int, default=0, help="the run seed that takes the trusted rows")
    parser.add_argument("--cell", type=Path, help="a finished cell with a trusted teacher, for comparison")
    parser.add_argument("--setfit-steps", type=int, default=200, help="contrastive steps (16 pairs each); 0: none")
    parser.add_argument("--setfit-learning-rate", type=float, default=2e-5)
    args = parser.parse_args()
    torch.set_num_threads(1)

    train = load_records(args.data / "train-mixed-0.1.csv")
    dev = load_records(args.data / "dev-clean.csv")
    test = load_records(args.data / "test-clean.csv")
    train_labels, poisoned = np.array(train.labels), np.array([record.poisoned for record in train.records])
    trusted, rest = reference_split_indices(len(dev.texts), TRUSTED_ROWS, args.seed)
    trusted_texts, trusted_labels = [dev.texts[i] for i in trusted], np.array(dev.labels)[trusted]
    held_out = ([dev.texts[i] for i in rest], np.array(dev.labels)[rest])

    if args.cell is not None:
        rows = json.loads((args.cell / "row_filter.json").read_text())["rows"]
        _report(
            "the cell's trusted teacher",
            np.array([np.argmax(r["teacher_log_probs"]) for r in rows]),
            train_labels,
            poisoned,
        )
    encoder = Encoder(str(default_model_dir()))

    def evaluate(name: str) -> None:
        weight, bias = fit_logistic(encoder.embed(trusted_texts), torch.tensor(trusted_labels), 2)

        def predict(texts: list[str]) -> np.ndarray:
            return (encoder.embed(texts) @ weight + bias).argmax(1).numpy()

        _report(
            name,
            predict(train.texts),
            train_labels,
            poisoned,
            dev_accuracy=np.mean(predict(held_out[0]) == held_out[1]),
            test_accuracy=np.mean(predict(test.texts) == np.array(test.labels)),
        )

    evaluate("embedding-lr")
    if args.setfit_steps:
        start = time.perf_counter()
        encoder.train_contrastive(
            trusted_texts, trusted_labels, args.setfit_steps, args.setfit_learning_rate, args.seed
        )
        print(f"setfit body: {args.setfit_steps} steps in {time.perf_counter() - start:.0f} s")
        evaluate(f"setfit ({args.setfit_steps} steps)")


if __name__ == "__main__":
    main()
