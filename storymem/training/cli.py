"""`storymem train`: the argparse front end over TrainConfig and train()."""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

from pydantic import ValidationError

from .config import TrainConfig
from .trainer import train


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train",
        help="train the M2V LoRA (or the whole tiny model) on a clip manifest",
        description="M2V training. Settings come from --config (YAML/JSON of TrainConfig fields) and the flags "
        "below, flags winning. Multi-process: launch with torchrun (gloo on CPU, nccl on GPU).",
    )
    p.add_argument("--config", type=Path, default=None, help="YAML or JSON file of TrainConfig fields")
    p.add_argument("--manifest", default=None, help="Parquet manifest (clip_id, group_id, path, prompt; optional subject_mask)")
    p.add_argument("--store", default=None, help="'s3://bucket' or a folder holding manifest and clips")
    p.add_argument("--output-dir", type=Path, default=None, help="checkpoints and final weights")
    p.add_argument("--full", action="store_true", default=None, help="full fine-tuning instead of a LoRA")
    p.add_argument("--init", choices=["pretrained", "random"], default=None, help="'random': from scratch (with --full)")
    p.add_argument("--experts", choices=["both", "high", "low"], default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="clips per process per step")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--warmup-steps", type=int, default=None)
    p.add_argument("--schedule", choices=["cosine", "constant"], default=None)
    p.add_argument("--lora-rank", type=int, default=None)
    p.add_argument("--lora-alpha", type=float, default=None)
    p.add_argument("--max-memory", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--save-every", type=int, default=None)
    p.add_argument("--no-resume", dest="resume", action="store_false", default=None, help="start over even if checkpoints exist")
    p.add_argument("--embedded-weights", type=Path, default=None, help="bundle of the embedded base model")
    p.add_argument("--i2v-path", type=Path, default=None, help="local diffusers Wan I2V folder (the base model)")
    p.add_argument("--device", default=None, help="'auto', 'cpu', 'cuda'")
    return p


_FLAG_FIELDS = (
    "manifest", "store", "output_dir", "full", "init", "experts", "steps", "batch_size", "lr", "warmup_steps",
    "schedule", "lora_rank", "lora_alpha", "max_memory", "seed", "save_every", "resume",
)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    data: dict = {}
    if args.config is not None:
        text = Path(args.config).read_text()
        data = (__import__("yaml").safe_load(text) if args.config.suffix in (".yaml", ".yml") else json.loads(text)) or {}
        if not isinstance(data, dict):
            raise ValueError(f"--config: {args.config} must hold a mapping of TrainConfig fields")
    for name in _FLAG_FIELDS:
        value = getattr(args, name, None)
        if value is not None:
            data[name] = value
    model = dict(data.get("model") or {})
    for flag, name in (("embedded_weights", "embedded_weights"), ("i2v_path", "i2v_path"), ("device", "device")):
        if getattr(args, flag, None) is not None:
            model[name] = getattr(args, flag)
    if model:
        data["model"] = model
    return TrainConfig.model_validate(data)


def run_train(args: argparse.Namespace) -> int:
    import sys

    try:
        cfg = config_from_args(args)
    except ValidationError as exc:
        for err in exc.errors(include_url=False):
            print(f"{'.'.join(str(x) for x in err['loc']) or 'config'}: {err['msg']}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:
        print(str(exc), file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        summary = train(cfg)
    except ValueError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps({k: v for k, v in summary.items()}, default=str))
    return 0
