"""The reward registry: small named factories, ``build_reward(name, source, device)`` builds one.

A factory has the signature ``factory(source: str | None, **options) -> RewardModel``; ``source`` is
a local path or hub id (``None``: the model's published default). Options from a local source's
``align_reward.json`` are merged under the caller's options. A reward registered outside this
package is named ``module:name`` (e.g. the shapes-world demo's
``align.demo.soft_judge:shapes-judge``): the module is imported first, which registers it.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable

import torch

from align.rewards.base import RewardModel
from align.rewards.sources import read_manifest

_FACTORIES: dict[str, Callable[..., RewardModel]] = {}
_ALIASES = {
    "hpsv2": "hps",
    "hpsv2.1": "hps",
    "pick": "pickscore",
    "clipscore": "clip",
    "clip-score": "clip",
    "laion-aesthetic": "aesthetic",
    "aesthetics": "aesthetic",
    "image-reward": "imagereward",
    "image_reward": "imagereward",
}


def register_reward(name: str):
    """Decorator: register ``factory`` under ``name`` (lower case)."""

    def wrap(factory: Callable[..., RewardModel]):
        _FACTORIES[name.lower()] = factory
        return factory

    return wrap


BUILTINS = "aesthetic clip_score compressibility denscore hps image_reward pickscore".split()


def _ensure_builtins() -> None:
    for name in BUILTINS:  # importing the modules registers their factories
        importlib.import_module(f"align.rewards.{name}")


def canonical_name(name: str) -> str:
    _ensure_builtins()
    module, _, name = name.strip().rpartition(":")
    if module:
        importlib.import_module(module)  # registers its rewards
    key = name.lower()
    key = _ALIASES.get(key, key)
    if key not in _FACTORIES:
        raise ValueError(f"unknown reward {name!r}; known: {', '.join(available_rewards())}")
    return key


def available_rewards() -> list[str]:
    _ensure_builtins()
    return sorted(_FACTORIES)


def build_reward(
    name: str,
    source: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    **options,
) -> RewardModel:
    """Build the reward ``name`` from ``source`` (local path or hub id; default: the published
    weights), frozen, in eval mode, on ``device`` in ``dtype``."""
    key = canonical_name(name)
    merged = {**read_manifest(source), **options}
    model = _FACTORIES[key](source, **merged)
    model.name = key
    return model.freeze().to(device=device, dtype=dtype)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # a config's reward dtypes


def reward_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def init_config(obj, args: dict) -> dict:
    """``{class_path, init_args}``: how a config names ``obj`` (hparams checked on resume, exports
    rebuilt by ``align export``), its ``__init__`` arguments read from ``args`` (that
    ``__init__``'s ``locals()``)."""
    cls = type(obj)
    names = list(inspect.signature(cls.__init__).parameters)[1:]
    return {
        "class_path": f"{cls.__module__}.{cls.__name__}",
        "init_args": {k: args[k] for k in names},
    }
