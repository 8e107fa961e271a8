"""Command line: `python -m converters to-jax|to-torch|merge-lora|inspect ...` (the names are a contract)."""

from __future__ import annotations

import argparse
import sys

from converters.mapping import ConversionError
from converters.readers import CheckpointReadError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m converters",
        description="Convert Qilin-Med-VL / LLaVA / HF checkpoints between PyTorch and qilin-jax.",
    )
    sub = p.add_subparsers(dest="cmd", required=True)

    j = sub.add_parser("to-jax", help="PyTorch checkpoint(s) -> qilin-jax checkpoint dir")
    j.add_argument("--src", required=True, help="LLM / LLaVA release / HF llava checkpoint dir or file")
    j.add_argument("--vision", help="CLIP checkpoint dir (when --src has no vision tower)")
    j.add_argument("--projector", help="stage-1 mm_projector.bin (adapter weights)")
    j.add_argument("--dst", required=True, help="output dir (must not exist, or be empty)")
    j.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="stored parameter dtype (default float32, the model's master dtype)",
    )
    j.add_argument("--preset", help="model preset to check against instead of inferring the config")
    j.add_argument("--seed", type=int, default=0, help="seed of a randomly initialised adapter")
    j.add_argument(
        "--lora",
        help="PEFT LoRA adapter dir (adapter_config.json + adapter_model.*) "
        "to load onto --src: the checkpoint carries the adapters",
    )
    j.add_argument("--overwrite", action="store_true", help="replace a non-empty --dst")

    t = sub.add_parser("to-torch", help="qilin-jax checkpoint dir -> PyTorch checkpoint")
    t.add_argument("--src", required=True, help="qilin-jax checkpoint dir (converter or training output)")
    t.add_argument("--dst", required=True, help="output dir")
    t.add_argument(
        "--format",
        required=True,
        choices=["hf-llava", "llava", "peft"],
        help="hf-llava: transformers LlavaForConditionalGeneration; llava: the original "
        "LLaVA/Qilin release layout (also for the linear adapter); peft: the LoRA "
        "adapters (+ the projector as modules_to_save) of a LoRA checkpoint or run, "
        "for peft.PeftModel.from_pretrained on LlavaForConditionalGeneration",
    )
    t.add_argument("--tokenizer", help="dir with tokenizer files to copy (default: src/tokenizer/)")
    t.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="output dtype (default: as stored)")
    t.add_argument("--max-shard-size", default="5GB", help="shard above this size (default 5GB)")
    t.add_argument("--bin", action="store_true", help="write pytorch_model*.bin pickles, not safetensors")
    t.add_argument(
        "--no-vision",
        action="store_true",
        help="llava format: leave the vision tower out (LLaVA loads it from mm_vision_tower)",
    )
    t.add_argument("--overwrite", action="store_true", help="replace a non-empty --dst")

    m = sub.add_parser(
        "merge-lora", help="LoRA checkpoint or run folder -> plain checkpoint with the adapters folded into the LLM"
    )
    m.add_argument("--src", required=True, help="qilin-jax checkpoint dir or run folder (its last stage)")
    m.add_argument("--dst", required=True, help="output dir")
    m.add_argument("--overwrite", action="store_true", help="replace a non-empty --dst")

    i = sub.add_parser("inspect", help="say what a PyTorch checkpoint holds")
    i.add_argument("--src", required=True)
    return p


def main(argv=None) -> int:
    """Run the CLI; returns the exit status (0 ok, 2 a checkpoint/config problem)."""
    args = _parser().parse_args(argv)
    try:
        if args.cmd == "to-jax":
            from converters.to_jax import to_jax

            to_jax(
                args.src,
                args.dst,
                vision=args.vision,
                projector=args.projector,
                dtype=args.dtype,
                preset=args.preset,
                seed=args.seed,
                overwrite=args.overwrite,
                lora=args.lora,
            )
        elif args.cmd == "merge-lora":
            from converters.peft import merge_lora

            merge_lora(args.src, args.dst, overwrite=args.overwrite)
        elif args.cmd == "to-torch" and args.format == "peft":
            from converters.peft import export_peft

            export_peft(args.src, args.dst, overwrite=args.overwrite)
        elif args.cmd == "to-torch":
            from converters.to_torch import to_torch

            to_torch(
                args.src,
                args.dst,
                format=args.format,
                tokenizer=args.tokenizer,
                dtype=args.dtype,
                max_shard_size=args.max_shard_size,
                bin=args.bin,
                include_vision=not args.no_vision,
                overwrite=args.overwrite,
            )
        else:
            from converters.to_jax import open_source

            s = open_source(args.src, "src")
            print(s.found.summary())
    except (ConversionError, CheckpointReadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
