"""Cached shards: VAE latents and text embeddings precomputed by ``align data cache-latents``, so
that training skips the VAE encoder (more FLOPs per 512 px image than the UNet forward) and the text
encoders.

Schema (webdataset tar members; tensors are ``.npy``, read with ``allow_pickle=False``):

* Pair shards (from pair shards, DPO): ``moments_0.npy``, ``moments_1.npy`` -- the VAE's
  DiagonalGaussian parameters (mean and logvar concatenated on the channel axis: ``(8, R/8, R/8)``
  for SD), of ``jpg_0`` and ``jpg_1`` in the *source* order; with ``--flip`` also
  ``moments_0_flip.npy``, ``moments_1_flip.npy`` (the moments of the horizontally flipped crop: the
  VAE does not commute with a flip, so they are encoded, not derived). ``embeds.npy`` ``(77, D)``:
  the prompt encoder's conditioning of the stripped caption; SDXL also ``pooled.npy`` ``(P,)``.
  ``json``: the source pair json unchanged (``caption``, ``label_0``, ``label_1``, uids...) plus a
  ``cache`` object: ``model``, ``model_fingerprint``, ``resolution``, ``crop`` ("center"), ``flip``,
  ``dtype`` (compute), ``store_dtype``, ``prompt_encoder`` ("clip") and per image, in source order,
  ``original_size`` ``[[h, w], ...]`` and ``crop_top_left`` ``[[top, left], ...]`` (SDXL's time
  ids). Ties are kept: winner-first order and tie dropping are decided at load time from the labels,
  exactly as ``align.data.pickapic.decode_pair`` does.
* Single-image shards (from KTO shards): ``moments.npy`` (+ ``moments_flip.npy``), ``embeds.npy``
  (+ ``pooled.npy``), ``json`` = the source json
  (``caption``, ``label``, ``image_uid``...) + ``cache``.
* Long-caption shards (SFT): as single-image shards,
  plus the ``txt`` caption member copied from the source.

Next to the shards: ``manifest.json`` (the shard writer's; its ``source.cache`` holds the same
settings, checked when a data module opens the cache) and ``uncond.npy`` ``(1, 77, D)`` (+
``uncond_pooled.npy``), the encoding of the empty prompt, which replaces the embedding of a caption
dropped by caption dropout (the module draws dropout exactly as on the image path, so both paths see
the same conditioning for the same random state).

Storage dtype: float16 by default. Its rounding (2^-11 relative) is below the error of computing the
latents in bf16, and far below the noise added at the smallest training timestep (std >= 0.029 on
unit-scale latents), and it halves the cache: SD1.5 at 512 px is 64 KiB of moments per image plus
118 KiB of text embeddings per caption (float32: twice that). ``--store-dtype float32`` keeps
encoder outputs bit-exact (the equality tests with the image path use it).

Crop: the cache holds one crop per image, the center crop of the shorter-side resize (the official
recipe's). A data module reading a cache with ``crop: random`` uses that center crop (logged once);
``flip_prob > 0`` needs a cache made with ``--flip`` (refused otherwise, before training).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
from pathlib import Path

import numpy as np
import torch

from align.data.images import decode_caption, decode_json, read_pair_meta, read_single_meta
from align.data.pipeline import SkipSample
from align.data.schema import CACHE_COMMAND, cache_settings
from align.data.writer import MANIFEST, load_manifest

log = logging.getLogger(__name__)

SCHEMAS = ("pair", "single", "long")
PAIR_MOMENTS = ("moments_0.npy", "moments_1.npy")
PAIR_MOMENTS_FLIP = ("moments_0_flip.npy", "moments_1_flip.npy")
SINGLE_MOMENTS, SINGLE_MOMENTS_FLIP = "moments.npy", "moments_flip.npy"
EMBEDS, POOLED = "embeds.npy", "pooled.npy"
UNCOND, UNCOND_POOLED = "uncond.npy", "uncond_pooled.npy"
STORE_DTYPES = {"float16": np.float16, "float32": np.float32}


# ------------------------------------------------------------------------------------------ tensors


def npy_bytes(array) -> bytes:
    """``.npy`` bytes of a numpy array or tensor (no pickle)."""
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def npy_tensor(data: bytes) -> torch.Tensor:
    return torch.from_numpy(np.lib.format.read_array(io.BytesIO(data), allow_pickle=False).copy())


def model_fingerprint(vae: torch.nn.Module, text_encoders: list[torch.nn.Module]) -> str:
    """A short hash of the VAE's and text encoders' configs and weights (a strided sample of every
    tensor, cast to float16 so that fp32 weights and their fp16 copies agree). Identifies what made
    a cache."""
    digest = hashlib.sha256()
    for i, module in enumerate([vae, *text_encoders]):
        config = getattr(module, "config", None)
        config = config.to_dict() if hasattr(config, "to_dict") else dict(config or {})
        config = {
            k: v
            for k, v in config.items()
            if not k.startswith("_") and k not in ("torch_dtype", "transformers_version")
        }
        described = json.dumps(config, sort_keys=True, default=str)
        digest.update(f"{i}:{type(module).__name__}:{described}".encode())
        for name, tensor in module.state_dict().items():
            flat = tensor.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 256)][:256].to("cpu", torch.float16)
            digest.update(f"{name}:{tuple(tensor.shape)}".encode())
            digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------------------- decoding


def _meta(sample: dict) -> dict:
    meta = decode_json(sample)
    if isinstance(meta, dict) and not isinstance(meta.get("cache"), dict):
        raise SkipSample("not_cached")
    return meta


def _tensor(sample: dict, key: str) -> torch.Tensor:
    data = sample.get(key)
    if data is None:
        raise SkipSample(f"missing_{key.split('.')[0]}")
    try:
        return npy_tensor(data)
    except Exception as exn:
        raise SkipSample("bad_npy", f"{key}: {exn!r}") from None


def _embeds(sample: dict, out: dict) -> dict:
    out["prompt_embeds"] = _tensor(sample, EMBEDS)
    if POOLED in sample:
        out["pooled_embeds"] = _tensor(sample, POOLED)
    return out


def decode_cached_pair(
    sample: dict,
    drop_ties: bool = True,
    flip_prob: float = 0.0,
    joint_augment: bool = True,
    rng: random.Random = random,
) -> dict:
    """One cached pair sample -> winner-first moments and the caption's embeddings
    (raises SkipSample).

    Mirrors ``decode_pair``: same schema checks and skip reasons, same tie handling, winner first by
    ``label_0``, and the same draws from ``rng`` (the winner's flip, then the loser's unless the
    pair shares it: ``joint_augment`` and equal original sizes), so a cached run flips the same
    pairs as an image run.
    """
    meta = _meta(sample)
    caption, label_0 = read_pair_meta(meta, drop_ties)
    cache = meta["cache"]
    order = (0, 1) if label_0 >= 0.5 else (1, 0)
    sizes = [tuple(cache["original_size"][i]) for i in order]
    flip_w = rng.random() < flip_prob
    flip_l = flip_w if (joint_augment and sizes[0] == sizes[1]) else rng.random() < flip_prob
    moments = [
        _tensor(sample, (PAIR_MOMENTS_FLIP if flip else PAIR_MOMENTS)[i])
        for i, flip in zip(order, (flip_w, flip_l))
    ]
    return _embeds(
        sample,
        {
            "latent_moments": torch.stack(moments),
            "original_size": torch.tensor(sizes),
            "crop_top_left": torch.tensor([cache["crop_top_left"][i] for i in order]),
            "caption": caption,
            "label": max(label_0, 1.0 - label_0),
            "key": sample.get("__key__", ""),
        },
    )


def decode_cached_single(
    sample: dict,
    want: bool | None = None,
    flip_prob: float = 0.0,
    rng: random.Random = random,
    source: str | None = None,
) -> dict | None:
    """One cached single-image (KTO) or long-caption sample -> moments and embeddings; None when it
    belongs to the other class's stream (``want``), as ``decode_single``. Long-caption samples read
    their ``txt``; ``source`` (a long-caption source's name) rides along when given."""
    meta = _meta(sample)
    if "txt" in sample:  # long-caption schema: the caption is the txt member
        caption, desirable = decode_caption(sample["txt"]), None
    else:
        read = read_single_meta(meta, want)
        if read is None:
            return None
        caption, desirable = read
    cache = meta["cache"]
    flip = rng.random() < flip_prob
    out = {
        "latent_moments": _tensor(sample, SINGLE_MOMENTS_FLIP if flip else SINGLE_MOMENTS),
        "original_size": torch.tensor(cache["original_size"][0]),
        "crop_top_left": torch.tensor(cache["crop_top_left"][0]),
        "caption": caption,
        "key": sample.get("__key__", ""),
    }
    if desirable is not None:
        out["desirable"] = desirable
    if source is not None:
        out["source"] = source
    return _embeds(sample, out)


# ---------------------------------------------------------------------------------- opening a cache


def read_cache_info(folder: str | os.PathLike) -> dict:
    """The settings of the cache in ``folder`` (its manifest's ``source.cache``) with its
    ``folder`` and whether it is ``complete``; ValueError naming the folder when it is not a
    finished cache."""
    folder = Path(folder)
    manifest = load_manifest(folder)
    cache = cache_settings(manifest)
    if cache is None:
        raise ValueError(
            f"{folder} is not a latent cache: no {MANIFEST} written by `align data "
            f"{CACHE_COMMAND}` there (make one with `align data {CACHE_COMMAND} --model ... "
            f"--shards ... --out {folder}`)"
        )
    if not (folder / UNCOND).is_file():
        raise ValueError(
            f"{folder}: {UNCOND} is missing (the cache run did not finish: rerun the same "
            f"`align data {CACHE_COMMAND}` command to resume it)"
        )
    return {**cache, "folder": str(folder), "complete": bool(manifest.get("complete"))}


class CachedShards:
    """The cache folders behind a data module's shard lists, checked before training, the decode
    functions that read them, and the ``extras`` every batch carries: ``uncond_embeds`` (1, L, D),
    ``uncond_pooled`` (1, P), and what made the cache (checked by the module).

    Args:
        url_sets: the shard lists (train, val, ...; None entries ignored) as ``expand_shards``
            returns them.
        schemas: the cache schemas this data module can read (``("pair",)`` for DPO).
        resolution: the data module's resolution: must be the cache's.
        flip_prob: > 0 needs caches made with ``--flip``.
        crop: the data module's crop; ``random`` cannot be honoured
            (the cache holds the center crop): logged.
    """

    def __init__(
        self,
        url_sets: list[list[str] | None],
        schemas: tuple[str, ...],
        resolution: int,
        flip_prob: float = 0.0,
        crop: str = "center",
    ):
        urls = [u for url_set in url_sets if url_set for u in url_set]
        folders = dict.fromkeys(os.path.dirname(os.path.abspath(u)) for u in urls)
        self.infos = [read_cache_info(folder) for folder in folders]
        for info in self.infos:
            folder, schema, res = info["folder"], info["schema"], info["resolution"]
            if schema not in schemas:
                raise ValueError(
                    f"{folder} caches {schema} shards; this data module reads "
                    f"{' or '.join(schemas)} shards"
                )
            if res != resolution:
                raise ValueError(
                    f"{folder} was cached at {res} px but resolution is {resolution}: set "
                    f"resolution: {res} or re-cache with --resolution {resolution}"
                )
            if flip_prob > 0 and not info["flip"]:
                raise ValueError(
                    f"{folder} has no flipped latents (cached without --flip) but flip_prob "
                    f"is {flip_prob}: set flip_prob: 0.0 or re-cache with --flip"
                )
            if not info["complete"]:
                log.warning(
                    "latent cache %s is incomplete (its run was interrupted): training "
                    "reads what is there",
                    folder,
                )
        first = self.infos[0]
        if any(i["model_fingerprint"] != first["model_fingerprint"] for i in self.infos):
            raise ValueError(
                "these caches were made with different models: "
                + ", ".join(
                    f"{i['folder']} ({i['model']}, {i['model_fingerprint']})" for i in self.infos
                )
            )
        if crop != "center":
            log.info("latent cache: crop=%r ignored, cached latents hold the center crop", crop)
        folder = Path(first["folder"])
        self.extras = {
            "uncond_embeds": npy_tensor((folder / UNCOND).read_bytes()),
            "cache_fingerprint": first["model_fingerprint"],
            "cache_model": first["model"],  # named when the module refuses the cache
        }
        if (folder / UNCOND_POOLED).is_file():
            self.extras["uncond_pooled"] = npy_tensor((folder / UNCOND_POOLED).read_bytes())

    def pair_decoder(self, flip_prob: float, drop_ties: bool, joint_augment: bool):
        return lambda sample, counter, rng: decode_cached_pair(
            sample, drop_ties, flip_prob, joint_augment, rng
        )

    def single_decoder(self, flip_prob: float, want: bool | None = None, source: str | None = None):
        return lambda sample, counter, rng: decode_cached_single(
            sample, want, flip_prob, rng, source=source
        )
