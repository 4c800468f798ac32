"""The model card (``README.md`` with YAML metadata) every export carries, as the Hub renders it."""

from __future__ import annotations

from pathlib import Path

import yaml

METHODS = {
    "DPOModule": "Diffusion-DPO",
    "KTOModule": "Diffusion-KTO",
    "SFTModule": "supervised fine-tuning",
    "RFTModule": "LongAlign reward fine-tuning",
    "PreferenceModelModule": "Denscore preference model",
}


def model_card(config: dict, metrics: dict[str, float] | None = None, lora: bool = False) -> str:
    """A card from a run's resolved config (``model``/``data``/``trainer``, as ``align fit`` saves
    it) and its final metrics: base model, method, data, how to load it, the base's license, the
    config."""
    model = config.get("model", {})
    args = model.get("init_args", {})
    base = str(args.get("model", "unknown"))
    method = METHODS.get(str(model.get("class_path", "")).rpartition(".")[2], "fine-tuning")
    data = config.get("data", {}).get("init_args", {})
    sources = {k: v for k, v in data.items() if "shards" in k or k in ("sources", "prompts") if v}
    meta = {
        "base_model": base,
        "library_name": "diffusers",
        "pipeline_tag": "text-to-image",
        "license": "other",
        "tags": ["align", method, "text-to-image", "diffusers"] + (["lora"] if lora else []),
    }
    load = (
        f"pipe = AutoPipelineForText2Image.from_pretrained({base!r})\n"
        "pipe.load_lora_weights(<this folder>)"
        if lora
        else "pipe = AutoPipelineForText2Image.from_pretrained(<this folder>)"
    )
    lines = [
        "---",
        yaml.safe_dump(meta, sort_keys=False).strip(),
        "---",
        "",
        f"# {method} of {base}",
        "",
        f"Trained with align ({method}){' as a LoRA adapter' if lora else ''}.",
        f"License: the base model's ({base}) applies.",
        "",
        "## Load",
        "",
        "```python",
        "from diffusers import AutoPipelineForText2Image",
        "",
        load,
        "```",
        "",
        "## Data",
        "",
        "```yaml",
        yaml.safe_dump(sources or {"data": "see the config"}).strip(),
        "```",
        "",
    ]
    if metrics:
        lines += (
            ["## Final metrics", ""]
            + [f"- `{k}`: {v:.6g}" for k, v in sorted(metrics.items())]
            + [""]
        )
    lines += [
        "## Config (as `align fit` resolved it)",
        "",
        "```yaml",
        yaml.safe_dump(config).strip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def write_model_card(
    folder: str | Path, config: dict, metrics: dict[str, float] | None = None, lora: bool = False
) -> Path:
    path = Path(folder) / "README.md"
    path.write_text(model_card(config, metrics, lora))
    return path
