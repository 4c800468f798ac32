"""A tiny CLIP preference model of the shapes world, trained on the judge's pairs: the reward RFT optimises.

The model is LongAlign's Denscore recipe at toy scale: ``PreferenceModelModule`` (a transformers ``CLIPModel``,
both towers and the logit scale trained with PickScore's objective over segment-aggregated scores) fed by
``PreferencePairDataModule``, run by a Lightning ``Trainer`` on the CPU. The judge's pair shards
(``align.demo.prefs.write_pairs``) are already in the schema that data module reads (Pick-a-Pic: ``jpg_0.jpg``,
``jpg_1.jpg``, ``json`` with ``caption``, ``label_0``, ``label_1``), so they are read as they are; a list of pair
samples (``prefs.pair_samples``) is first written with ``write_pairs``. The export is a Denscore directory:
``build_reward("denscore", str(path))`` loads it, and RFT takes it as ``reward="denscore", reward_source=path``.

Image size: the demo's images are 32 px. The tiny CLIP of ``align.rewards.tiny`` takes 224 px (patch 32), which
would upsample every 32 px image sevenfold and see each 16 px grid cell through about four patches. By default
the model here is that same tiny CLIP (text tower, widths, tokenizer, CLIP normalisation) with its vision tower
built for 32 px inputs and 4 px patches (an 8 x 8 patch grid, 4 x 4 patches per cell): the CLIP preprocessing
(resize the shorter side to 32, center-crop 32, normalise) is then the identity plus normalisation on 32 px
images, both for PIL images and for the differentiable tensor path RFT scores with.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import lightning as L
import numpy as np
import torch

from align.demo import world
from align.demo.base import log

DEFAULT_IMAGE_SIZE = world.SIZE
DEFAULT_PATCH_SIZE = 4
CORRUPTIONS = ("color", "shape", "position", "missing")


# ---- the model ---------------------------------------------------------------------------------------------
def write_small_clip(out: str | Path, image_size: int = DEFAULT_IMAGE_SIZE, patch_size: int = DEFAULT_PATCH_SIZE,
                     seed: int = 0, width: int | None = None, projection_dim: int | None = None) -> Path:
    """The tiny CLIP of ``align.rewards.tiny`` with a vision tower for ``image_size`` px inputs in
    ``patch_size`` px patches (random weights from ``seed``), written in the Denscore layout with a CLIP image
    processor config for ``image_size``. ``width`` (both towers' hidden size, MLPs 4x) and ``projection_dim``
    (the embedding) default to the tiny CLIP's (32 and 16)."""
    from transformers import CLIPModel

    from align.modules.preference import TINY, load_clip
    from align.rewards.denscore import write_denscore_export

    if image_size % patch_size:
        raise ValueError(f"patch_size {patch_size} does not divide image_size {image_size}")
    tiny, tokenizer, processor = load_clip(TINY, seed=seed)
    config = tiny.config
    config.vision_config.image_size, config.vision_config.patch_size = image_size, patch_size
    if width is not None:
        for tower in (config.vision_config, config.text_config):
            tower.hidden_size, tower.intermediate_size = width, 4 * width
    if projection_dim is not None:
        config.projection_dim = config.vision_config.projection_dim = config.text_config.projection_dim = projection_dim
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    return write_denscore_export(model, tokenizer, out, image_size=image_size, image_mean=processor.image_mean,
                                 image_std=processor.image_std)


def _vision_size(source: str, seed: int) -> int:
    from align.modules.preference import load_clip

    return int(load_clip(source, seed=seed)[0].config.vision_config.image_size)


# ---- training ----------------------------------------------------------------------------------------------
class AccuracyCurve(L.Callback):
    """Held-out pairwise accuracy of the model being trained (its own Denscore scorer, which scores exactly as
    the export does) at step 0, every ``every`` steps and at the end."""

    def __init__(self, pairs: list[dict], every: int, batch_size: int = 64):
        self.pairs, self.every, self.batch_size = pairs, every, batch_size
        self.curve: list[tuple[int, float]] = []

    def _eval(self, trainer, module) -> None:
        step = trainer.global_step
        if self.curve and self.curve[-1][0] == step:
            return
        scorer = module.scorer
        was_training = scorer.training
        scorer.eval()
        try:
            acc = pairwise_accuracy(scorer, self.pairs, self.batch_size)
        finally:
            scorer.train(was_training)
        self.curve.append((step, acc))
        log(f"  preference model step {step}: held-out pairwise accuracy {acc:.3f}")

    def on_train_start(self, trainer, module):
        self._eval(trainer, module)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if self.every and trainer.global_step % self.every == 0:
            self._eval(trainer, module)

    def on_train_end(self, trainer, module):
        self._eval(trainer, module)


def train_preference_model(pair_shards, out_dir: str | Path, steps: int = 300, seed: int = 0, lr: float = 1e-3,
                           batch_size: int = 32, image_size: int = DEFAULT_IMAGE_SIZE,
                           patch_size: int = DEFAULT_PATCH_SIZE, width: int | None = None,
                           projection_dim: int | None = None, base_model: str | None = None,
                           weight_decay: float = 0.01, warmup_steps: int = 10, logit_scale: float | None = None,
                           drop_ties: bool = False, splitter: str = "official", shuffle_buffer: int = 256,
                           eval_pairs: Sequence[dict] | None = None, eval_every: int = 0) -> Path:
    """Train a tiny CLIP preference model (Denscore) on the judge's pairs and export it; returns the export.

    Args:
        pair_shards: a directory, a shard, a pattern or a list of them (Pick-a-Pic-schema pair tars, as
            ``prefs.write_pairs`` writes them), or a list of pair samples (``prefs.pair_samples`` dicts), which
            are written to ``out_dir/pairs`` first.
        out_dir: gets ``init/`` (the untrained CLIP), ``export/`` (the trained Denscore directory, returned) and
            ``train_summary.json`` (settings, last logged training metrics, seconds, accuracy curve).
        steps / lr / batch_size (pairs per step) / weight_decay / warmup_steps: AdamW with a linear warm-up from
            lr / 10 over ``warmup_steps``, as ``configs/longalign/denscore_tiny.yaml``.
        image_size / patch_size / width / projection_dim: the default model (``write_small_clip``).
        base_model: start from this CLIP instead (``tiny-clip`` or a CLIPModel directory); the data module then
            crops to its vision tower's size.
        logit_scale: None trains CLIP's own temperature (PickScore); a number fixes it.
        drop_ties: drop 0.5 / 0.5 pairs (default False: PickScore's objective trains on ties).
        eval_pairs / eval_every: held-out pair samples whose pairwise accuracy is recorded at step 0, every
            ``eval_every`` steps (0: only at the ends) and after the last step.
    """
    from align.data.preference import PreferencePairDataModule
    from align.demo.prefs import write_pairs
    from align.modules.preference import PreferenceModelModule

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(pair_shards, (list, tuple)) and pair_shards and isinstance(pair_shards[0], dict):
        write_pairs(out / "pairs", list(pair_shards), shards=4, seed=seed)
        pair_shards = str(out / "pairs")
    elif isinstance(pair_shards, (list, tuple)):
        pair_shards = [str(p) for p in pair_shards]
    else:
        pair_shards = str(pair_shards)

    if base_model is None:
        source = str(write_small_clip(out / "init", image_size, patch_size, seed=seed, width=width,
                                      projection_dim=projection_dim))
    else:
        source, image_size = base_model, _vision_size(base_model, seed)

    L.seed_everything(seed, workers=True, verbose=False)
    module = PreferenceModelModule(
        model=source, splitter=splitter, logit_scale=logit_scale, seed=seed,
        optimizer=partial(torch.optim.AdamW, lr=lr, weight_decay=weight_decay),
        lr_scheduler=(partial(torch.optim.lr_scheduler.LinearLR, start_factor=0.1, total_iters=warmup_steps)
                      if warmup_steps > 0 else None))
    data = PreferencePairDataModule(train_shards=pair_shards, batch_size=batch_size, image_size=image_size,
                                    drop_ties=drop_ties, num_workers=0, shuffle_buffer=shuffle_buffer,
                                    batches_per_epoch=steps, seed=seed)
    callbacks = []
    curve = None
    if eval_pairs is not None:
        curve = AccuracyCurve(list(eval_pairs), eval_every)
        callbacks.append(curve)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=1.0,
                        num_sanity_val_steps=0, limit_val_batches=0, callbacks=callbacks)
    t = time.time()
    trainer.fit(module, data)
    seconds = time.time() - t
    export = module.export(out / "export")
    summary = {
        "steps": trainer.global_step, "seed": seed, "lr": lr, "batch_size": batch_size, "image_size": image_size,
        "patch_size": patch_size if base_model is None else None, "width": width,
        "projection_dim": projection_dim, "base_model": base_model, "drop_ties": drop_ties,
        "logit_scale": logit_scale, "train_seconds": seconds,
        "last_train_metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
        "accuracy_curve": curve.curve if curve else None,
    }
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return export


# ---- evaluation --------------------------------------------------------------------------------------------
def read_pairs(shards) -> list[dict]:
    """Pair samples from pair shards: the json's fields (``caption``, ``label_0``, ...) and ``image_0`` /
    ``image_1`` as uint8 arrays (as decoded from the shards' JPEGs)."""
    import webdataset as wds

    from align.data.images import decode_image, decode_json
    from align.data.pipeline import expand_shards
    from align.data.schema import PAIR_IMAGE_KEYS

    out = []
    for sample in wds.DataPipeline(wds.SimpleShardList(expand_shards(shards)), wds.tarfile_to_samples()):
        meta = decode_json(sample)
        first, second = (np.asarray(decode_image(sample, key)) for key in PAIR_IMAGE_KEYS)
        out.append({**meta, "label_0": float(meta["label_0"]), "image_0": first, "image_1": second})
    return out


def _to_tensor(images: Sequence) -> torch.Tensor:
    """(N, 3, H, W) float in [0, 1] from PIL images or (H, W, 3) arrays (uint8, or float in [0, 1])."""
    return torch.from_numpy(np.stack([world.to_array(im) for im in images])).permute(0, 3, 1, 2).float() / 255.0


@torch.no_grad()
def pairwise_accuracy(reward, pairs, batch_size: int = 64) -> float:
    """Fraction of decisive pairs (``label_0`` != 0.5) whose winner ``reward`` scores higher (an exact tie of
    scores counts as half). ``pairs``: pair samples (``prefs.pair_samples`` dicts) or pair shards. Images are
    scored as tensors in [0, 1], the differentiable preprocessing path RFT scores with. NaN without decisive
    pairs."""
    if not (isinstance(pairs, (list, tuple)) and (not pairs or isinstance(pairs[0], dict))):
        pairs = read_pairs(pairs)
    decisive = [p for p in pairs if float(p["label_0"]) != 0.5]
    if not decisive:
        return float("nan")
    captions = [p["caption"] for p in decisive]
    s0 = reward.score(_to_tensor([p["image_0"] for p in decisive]), captions, batch_size=batch_size)
    s1 = reward.score(_to_tensor([p["image_1"] for p in decisive]), captions, batch_size=batch_size)
    first_wins = torch.tensor([float(p["label_0"]) > 0.5 for p in decisive], device=s0.device)
    margin = torch.where(first_wins, s0 - s1, s1 - s0)
    return float(((margin > 0).float() + 0.5 * (margin == 0).float()).mean())


# ---- rendered pairs (tests, the accuracy experiment) --------------------------------------------------------
def corrupt(scene: tuple, kind: str, rng: random.Random) -> tuple | None:
    """``scene`` with one object's colour / shape / cell wrong, or one object removed (``kind`` in
    ``CORRUPTIONS``); None when the kind is impossible (a move in a full grid, anything in an empty scene)."""
    if not scene:
        return None
    objs = list(scene)
    i = rng.randrange(len(objs))
    o = objs[i]
    if kind == "color":
        objs[i] = world.Obj(o.cell, rng.choice([c for c in world.COLORS if c != o.color]), o.shape)
    elif kind == "shape":
        objs[i] = world.Obj(o.cell, o.color, rng.choice([s for s in world.SHAPES if s != o.shape]))
    elif kind == "position":
        free = sorted(set(range(world.GRID * world.GRID)) - {x.cell for x in objs})
        if not free:
            return None
        objs[i] = world.Obj(rng.choice(free), o.color, o.shape)
    elif kind == "missing":  # a one-object scene becomes empty: the base model's commonest failure
        del objs[i]
    else:
        raise ValueError(f"unknown corruption {kind!r}; one of {CORRUPTIONS}")
    return tuple(sorted(objs, key=lambda x: x.cell))


def rendered_pairs(n: int, seed: int = 0, kinds: Sequence[str] = CORRUPTIONS, min_objects: int = 1,
                   max_objects: int = 1, jitter: bool = True) -> list[dict]:
    """``n`` judge-labelled pairs of rendered images: a caption's scene against the same scene with one
    corruption (kinds drawn in turn), in random order; labels come from the judge (``prefs.build_records`` +
    ``pair_samples``), so they are the judge's, and a pair the judge cannot tell apart is a tie (0.5). Each pair
    also records its ``corruption``."""
    from align.demo.prefs import build_records, pair_samples

    rng = random.Random(seed)
    captions, images, kinds_used = [], [], []
    while len(captions) < n:
        scene = world.random_scene(rng, min_objects, max_objects)
        possible = [k for k in kinds if corrupt(scene, k, random.Random(0)) is not None]
        if not possible:
            continue
        kind = possible[len(captions) % len(possible)]
        bad = corrupt(scene, kind, rng)
        pair = [world.render(scene, rng if jitter else None), world.render(bad, rng if jitter else None)]
        if rng.random() < 0.5:
            pair.reverse()
        captions.append(world.caption(scene))
        kinds_used.append(kind)
        images += [np.asarray(im) for im in pair]
    pairs = pair_samples(build_records(captions, np.stack(images), 2))
    for p, kind in zip(pairs, kinds_used):
        p["corruption"] = kind
    return pairs
