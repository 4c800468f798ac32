"""Model loading (local directory, hub id or named preset),
the offline CLIP tokenizer and prompt encoders."""

from align.models.loader import ModelSourceError, SDComponents, build_preset, load_components
from align.models.presets import PRESETS

__all__ = ["SDComponents", "ModelSourceError", "build_preset", "load_components", "PRESETS"]
