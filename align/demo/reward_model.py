"""A tiny CLIP preference model of the shapes world, trained on the judge's pairs:
the reward RFT optimises.

The model is LongAlign's Denscore recipe at toy scale: ``PreferenceModelModule`` (a transformers
``CLIPModel``, both towers and the logit scale trained with PickScore's objective over
segment-aggregated scores) fed by ``PreferencePairDataModule``, run by
``align fit --config configs/demo/preference_model.yaml``. The judge's pair shards
(``align.demo.prefs.write_pairs``) are already in the schema that data module reads. The export is a
Denscore directory: ``build_reward("denscore", str(path))`` loads it, and RFT's
``SegmentPreference`` takes it as its ``source``.

Image size: the demo's images are 32 px. The tiny CLIP of ``align.rewards.tiny`` takes 224 px (patch
32), which would upsample every 32 px image sevenfold and see each 16 px grid cell through about
four patches. By default the model here is that same tiny CLIP (text tower, widths, tokenizer, CLIP
normalisation) with its vision tower built for 32 px inputs and 4 px patches (an 8 x 8 patch grid, 4
x 4 patches per cell): the CLIP preprocessing (resize the shorter side to 32, center-crop 32,
normalise) is then the identity plus normalisation on 32 px images, both for PIL images and for the
differentiable tensor path RFT scores with.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from align.demo import world

DEFAULT_IMAGE_SIZE = world.SIZE
DEFAULT_PATCH_SIZE = 4
CORRUPTIONS = ("color", "shape", "position", "missing")


# ---- the model -----------------------------------------------------------------------------------
def write_small_clip(
    out: str | Path,
    image_size: int = DEFAULT_IMAGE_SIZE,
    patch_size: int = DEFAULT_PATCH_SIZE,
    seed: int = 0,
) -> Path:
    """The tiny CLIP of ``align.rewards.tiny`` with a vision tower for ``image_size`` px inputs in
    ``patch_size`` px patches (random weights from ``seed``), written in the Denscore layout with a
    CLIP image processor config for ``image_size``."""
    from transformers import CLIPModel

    from align.modules.preference import TINY, load_clip
    from align.rewards.denscore import write_denscore_export

    if image_size % patch_size:
        raise ValueError(f"patch_size {patch_size} does not divide image_size {image_size}")
    tiny, tokenizer, processor = load_clip(TINY, seed=seed)
    config = tiny.config
    config.vision_config.image_size, config.vision_config.patch_size = image_size, patch_size
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    return write_denscore_export(
        model,
        tokenizer,
        out,
        image_size=image_size,
        image_mean=processor.image_mean,
        image_std=processor.image_std,
    )


# ---- evaluation ----------------------------------------------------------------------------------
def read_pairs(shards) -> list[dict]:
    """Pair samples from pair shards: the json's fields (``caption``, ``label_0``, ...) and
    ``image_0`` / ``image_1`` as uint8 arrays (as decoded from the shards' JPEGs)."""
    import webdataset as wds

    from align.data.images import decode_image, decode_json
    from align.data.pipeline import expand_shards
    from align.data.schema import PAIR_IMAGE_KEYS

    out = []
    for sample in wds.DataPipeline(
        wds.SimpleShardList(expand_shards(shards)), wds.tarfile_to_samples()
    ):
        meta = decode_json(sample)
        first, second = (np.asarray(decode_image(sample, key)) for key in PAIR_IMAGE_KEYS)
        out.append({**meta, "label_0": float(meta["label_0"]), "image_0": first, "image_1": second})
    return out


def _to_tensor(images: Sequence) -> torch.Tensor:
    """(N, 3, H, W) float in [0, 1] from PIL images or (H, W, 3) arrays
    (uint8, or float in [0, 1])."""
    arrays = np.stack([world.to_array(im) for im in images])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 255.0


@torch.no_grad()
def pairwise_accuracy(reward, pairs, batch_size: int = 64) -> float:
    """Fraction of decisive pairs (``label_0`` != 0.5) whose winner ``reward`` scores higher (an
    exact tie of scores counts as half). ``pairs``: pair samples (``prefs.pair_samples`` dicts) or
    pair shards. Images are scored as tensors in [0, 1], the differentiable preprocessing path RFT
    scores with. NaN without decisive pairs."""
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


# ---- rendered pairs (tests, the accuracy experiment) ---------------------------------------------
def corrupt(scene: tuple, kind: str, rng: random.Random) -> tuple | None:
    """``scene`` with one object's colour / shape / cell wrong, or one object removed (``kind`` in
    ``CORRUPTIONS``); None when the kind is impossible (a move in a full grid,
    anything in an empty scene)."""
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


def rendered_pairs(n: int, seed: int = 0, max_objects: int = 1) -> list[dict]:
    """``n`` judge-labelled pairs of rendered (jittered) images: a caption's scene against the same
    scene with one corruption (``CORRUPTIONS`` drawn in turn), in random order; labels come from
    the judge (``prefs.build_records`` + ``pair_samples``), so they are the judge's, and a pair the
    judge cannot tell apart is a tie (0.5). Each pair also records its ``corruption``."""
    from align.demo.prefs import build_records, pair_samples

    rng = random.Random(seed)
    captions, images, kinds_used = [], [], []
    while len(captions) < n:
        scene = world.random_scene(rng, 1, max_objects)
        possible = [k for k in CORRUPTIONS if corrupt(scene, k, random.Random(0)) is not None]
        if not possible:
            continue
        kind = possible[len(captions) % len(possible)]
        bad = corrupt(scene, kind, rng)
        pair = [world.render(scene, rng), world.render(bad, rng)]
        if rng.random() < 0.5:
            pair.reverse()
        captions.append(world.caption(scene))
        kinds_used.append(kind)
        images += [np.asarray(im) for im in pair]
    pairs = pair_samples(build_records(captions, np.stack(images), 2))
    for p, kind in zip(pairs, kinds_used):
        p["corruption"] = kind
    return pairs
