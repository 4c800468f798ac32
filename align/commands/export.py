"""Export a training checkpoint as a diffusers folder with a model card, and push it to the Hub.

Examples:
    align export --checkpoint logs/align-dpo/<run> --out exports/dpo-sd15 --dtype fp16
    align export --checkpoint logs/align-dpo/<run>/checkpoints/last.ckpt --out exports/dpo \
        --push-to-hub me/dpo

The run's ``config.yaml`` (beside its ``checkpoints/``) rebuilds the module; the checkpoint's
trainable weights are loaded into it; the folder is written beside ``--out`` and renamed into place
(never half written). ``--push-to-hub`` uploads it with huggingface_hub; without network or a token
the folder stays, ready to push, and the command says how.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from align.commands import tool_parser


def parser() -> argparse.ArgumentParser:
    p = tool_parser("align export", __doc__, details=True)
    add = p.add_argument
    add("--checkpoint", required=True, help="a run directory or a .ckpt file of one")
    add("--out", required=True, help="the export folder (replaced if it exists)")
    add("--dtype", default="fp32", help="fp32, fp16 or bf16")
    add("--push-to-hub", metavar="REPO", help="upload to this Hub repository (org/name)")
    add("--private", action="store_true", help="create the Hub repository private")
    return p


def find_run(checkpoint: str) -> tuple[Path, Path]:
    """(the .ckpt file, the run's config.yaml) of a run directory or a checkpoint file."""
    path = Path(checkpoint).expanduser()
    if path.is_dir():
        ckpts = sorted((path / "checkpoints").glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
        last = path / "checkpoints" / "last.ckpt"
        if not ckpts:
            raise FileNotFoundError(f"no checkpoint under {path / 'checkpoints'}")
        ckpt, run = (last if last.is_file() else ckpts[-1]), path
    elif path.is_file():
        ckpt, run = path, path.parent.parent if path.parent.name == "checkpoints" else path.parent
    else:
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist")
    config = run / "config.yaml"
    if not config.is_file():
        raise FileNotFoundError(
            f"no config.yaml in {run}: the run's resolved config rebuilds the module"
        )
    return ckpt, config


def instantiate(value):
    """A ``{class_path, init_args}`` value (an injected part, e.g. RFT's objective) built;
    others as is."""
    if not (isinstance(value, dict) and "class_path" in value):
        return value
    module_path, _, name = value["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module_path), name)
    return cls(**{k: instantiate(v) for k, v in (value.get("init_args") or {}).items()})


def build_module(config: dict, ckpt: Path):
    """The run's module with the checkpoint's trained weights (frozen parts from the base model)."""
    import torch

    model = config["model"]
    args = model.get("init_args", {})
    args = {k: v for k, v in args.items() if k not in ("optimizer", "lr_scheduler")}
    module = instantiate({"class_path": model["class_path"], "init_args": args})
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    module.load_state_dict({**module.state_dict(), **state})
    return module.eval()


def push(folder: Path, repo: str, private: bool) -> str | None:
    """Upload ``folder`` to ``repo``; the reason it could not, or None."""
    import os

    from huggingface_hub import HfApi, get_token

    ready = f"the folder {folder} is ready to push: `hf upload {repo} {folder}`"
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return f"HF_HUB_OFFLINE=1 (no network): {ready} where there is a network"
    if not get_token():
        return f"no Hugging Face token (`hf auth login` or HF_TOKEN): {ready}"
    try:
        api = HfApi()
        api.create_repo(repo, private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo)
    except Exception as err:  # network, permissions: the folder is intact, say so
        return f"upload failed ({type(err).__name__}: {err}): {ready}"
    return None


def main(argv: list[str] | None = None) -> int:
    import yaml

    from align.callbacks.export import write_export
    from align.models.export_dtype import export_dtype

    args = parser().parse_args(argv)
    try:
        export_dtype(args.dtype)
        ckpt, config_path = find_run(args.checkpoint)
        config = yaml.safe_load(config_path.read_text())
        module = build_module(config, ckpt)
    except (FileNotFoundError, ValueError) as err:  # ModelSourceError is a ValueError
        print(f"align export: error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out).expanduser()
    write_export(module, out, args.dtype, config)
    print(f"exported {ckpt} -> {out} ({args.dtype})")
    if args.push_to_hub:
        problem = push(out, args.push_to_hub, args.private)
        if problem:
            print(f"align export: {problem}", file=sys.stderr)
            return 1
        print(f"pushed {out} to https://huggingface.co/{args.push_to_hub}")
    return 0
