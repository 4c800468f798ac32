"""LightningModules: one base that owns the models, one thin subclass per objective."""

from align.modules.base import DiffusionModule
from align.modules.dpo import DPOModule
from align.modules.kto import KTOModule
from align.modules.grpo import GRPOModule
from align.modules.preference import PreferenceModelModule
from align.modules.rft import RFTModule
from align.modules.sft import SFTModule

__all__ = [
    "DiffusionModule",
    "DPOModule",
    "GRPOModule",
    "KTOModule",
    "PreferenceModelModule",
    "RFTModule",
    "SFTModule",
]
