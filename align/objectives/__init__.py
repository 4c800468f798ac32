"""Pure tensor objectives. Nothing here imports Lightning: every loss is a function of tensors,
testable against values computed by hand."""

from align.objectives.common import diffusion_target, per_sample_error
from align.objectives.denoise import DenoiseOutput, denoise_loss, min_snr_weights
from align.objectives.distributed import all_reduce_mean, is_distributed
from align.objectives.dpo import DPOOutput, dpo_loss
from align.objectives.kto import UTILITIES, KTOOutput, kto_loss, kto_reference_point
from align.objectives.preference import PreferenceOutput, preference_loss
from align.objectives.reward import (
    DecomposedScore,
    DegenerateDirection,
    NonFiniteReward,
    common_direction,
    decompose_text,
    decomposed_score,
    load_direction,
    rft_loss,
    save_direction,
    segment_cosines,
    segment_score,
    segment_text_embedding,
)

__all__ = [
    "diffusion_target",
    "per_sample_error",
    "dpo_loss",
    "DPOOutput",
    "kto_loss",
    "kto_reference_point",
    "KTOOutput",
    "UTILITIES",
    "denoise_loss",
    "DenoiseOutput",
    "min_snr_weights",
    "preference_loss",
    "PreferenceOutput",
    "all_reduce_mean",
    "is_distributed",
    "DecomposedScore",
    "DegenerateDirection",
    "NonFiniteReward",
    "common_direction",
    "decompose_text",
    "decomposed_score",
    "load_direction",
    "save_direction",
    "rft_loss",
    "segment_cosines",
    "segment_score",
    "segment_text_embedding",
]
