"""Cast a written diffusers export (pipeline folder or LoRA file) to fp16 / bf16, file by file.

Working on the files keeps the training weights untouched and needs memory for one file at a time:
the export is written in float32 (what training holds) and cast before it is renamed into view.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

EXPORT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def export_dtype(name: str) -> torch.dtype:
    try:
        return EXPORT_DTYPES[name]
    except KeyError:
        raise ValueError(
            f"unknown export dtype {name!r}; known: {', '.join(EXPORT_DTYPES)}"
        ) from None


def cast_export(folder: str | Path, name: str) -> None:
    """Every floating tensor of every ``.safetensors`` file under ``folder`` in dtype ``name``; the
    transformers configs say so (``torch_dtype``)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    dtype = export_dtype(name)
    if dtype == torch.float32:
        return
    for file in Path(folder).rglob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            metadata = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
        save_file(tensors, str(file), metadata=metadata)
    for config in Path(folder).rglob("config.json"):
        data = json.loads(config.read_text())
        for key in ("torch_dtype", "dtype"):
            if key in data:
                data[key] = str(dtype).removeprefix("torch.")
        config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
