"""The official launchers' settings beside which ``align plan`` prints a paper config's.

Each recipe names where its numbers come from. ``reasons`` says why a config of ours differs where
it does on purpose; a difference without one is printed as unexplained. Values use the vocabulary
of our configs (optimizer class names, Lightning precision strings).
"""

from __future__ import annotations

from dataclasses import dataclass, field

# differences every recipe shares the reason of
COMMON_REASONS = {
    "GPUs": "the global batch is the unit: accumulation follows from the GPU count",
    "micro-batch": "per-GPU memory choice; the global batch is kept",
    "accumulation": "follows from GPUs x micro-batch to reach the global batch",
}


@dataclass(frozen=True)
class Recipe:
    source: str
    settings: dict[str, object]
    reasons: dict[str, str] = field(default_factory=dict)


_DPO_SD15 = {
    "GPUs": 16,
    "micro-batch": 1,
    "accumulation": 128,
    "global batch": 2048,
    "optimizer": "AdamW",
    "learning rate": 2.048e-5,
    "warm-up steps": 500,
    "steps": 2000,
    "grad clip": 1.0,
    "beta": 5000,
    "caption dropout": 0.2,
    "resolution": 512,
    "precision": "16-mixed",
}
_DPO_SOURCE = (
    "SalesforceAIResearch/DiffusionDPO launchers/{}.sh and train.py defaults "
    "(lr 1e-8 x --scale_lr 2048, 16 GPUs for the paper's 2048, fp16 autocast)"
)

RECIPES: dict[str, Recipe] = {
    "dpo/sd15.yaml": Recipe(_DPO_SOURCE.format("sd15"), _DPO_SD15),
    "dpo/sdxl.yaml": Recipe(
        _DPO_SOURCE.format("sdxl") + ", madebyollin/sdxl-vae-fp16-fix",
        {**_DPO_SD15, "optimizer": "Adafactor", "warm-up steps": 200, "resolution": 1024},
    ),
    "sft/winners_sd15.yaml": Recipe(
        _DPO_SOURCE.format("sd15") + " with --sft (the preferred image of each pair)",
        {k: v for k, v in _DPO_SD15.items() if k != "beta"},
        {"micro-batch": "2 images per GPU: the DPO run's 2 images per forward"},
    ),
    "kto/sd15.yaml": Recipe(
        "jacklishufan/diffusion-kto exps/example.sh and config.json "
        "(4 processes, DeepSpeed accumulation 1)",
        {
            "GPUs": 4,
            "micro-batch": 2,
            "accumulation": 1,
            "global batch": 8,
            "optimizer": "AdamW8bit",
            "learning rate": 1e-7,
            "warm-up steps": 200,
            "steps": 20000,
            "grad clip": 1.0,
            "beta": 1000,
            "caption dropout": 0.2,
            "resolution": 512,
            "precision": "16-mixed",
        },
        {
            "optimizer": "8-bit Adam is optional: --config configs/optim/adamw8bit.yaml",
            "warm-up steps": "the paper's 1000 (Li et al. 2024); the launcher runs 200",
            "steps": "the paper's 10 k; the launcher runs 20 k",
            "beta": "the paper's 5000; the launcher runs 1000",
        },
    ),
    "longalign/sft_sd15.yaml": Recipe(
        "luping-liu/LongAlign SFT (DESIGN.md: LongAlign)",
        {
            "global batch": 192,
            "learning rate": 3e-5,
            "warm-up steps": 2000,
            "steps": 30000,
            "grad clip": 0.3,
            "caption dropout": 0.1,
            "resolution": 512,
            "LoRA rank": 32,
            "LoRA dropout": 0.1,
        },
    ),
    "longalign/rft_sd15.yaml": Recipe(
        "luping-liu/LongAlign unet_reward.py (DESIGN.md: LongAlign)",
        {
            "global batch": 48,
            "learning rate": 3e-5,
            "warm-up steps": 2000,
            "steps": 4000,
            "grad clip": 0.3,
            "resolution": 512,
            "LoRA rank": 32,
            "LoRA dropout": 0.1,
        },
    ),
}


def recipe_for(config_path: str) -> tuple[str, Recipe] | None:
    """The recipe of a config file under a ``configs/`` directory (``configs/dpo/sd15.yaml``)."""
    key = str(config_path).replace("\\", "/").rpartition("configs/")[2]
    return (key, RECIPES[key]) if key in RECIPES else None
