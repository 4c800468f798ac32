"""Pure tensor objectives. Nothing here imports Lightning: every loss is a function of tensors,
testable against values computed by hand."""

# README names these two as align.objectives.dpo_loss / kto_loss; everything else is imported
# from its submodule.
from align.objectives.dpo import dpo_loss
from align.objectives.kto import kto_loss

__all__ = ["dpo_loss", "kto_loss"]
