"""Helpers that keep frozen parts frozen: no gradients, eval mode,
out of optimizers and checkpoints."""

from __future__ import annotations

import contextlib

import torch
from torch import nn


def freeze(module: nn.Module) -> nn.Module:
    module.requires_grad_(False)
    return module.eval()


@contextlib.contextmanager
def adapters_disabled(unet: nn.Module):
    """The base weights of a LoRA-adapted UNet, i.e. the reference model,
    without a second UNet in memory."""
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()


def trainable_state_dict(module: nn.Module, state_dict: dict) -> dict:
    """Only the entries of parameters that train: frozen weights are rebuilt from the model source
    on load."""
    keep = {name for name, p in module.named_parameters() if p.requires_grad}
    return {k: v for k, v in state_dict.items() if k in keep}


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def no_grad_mode(inference: bool):
    """Inference mode (no autograd bookkeeping at all) for reference forwards, or plain no_grad."""
    return torch.inference_mode() if inference else torch.no_grad()
