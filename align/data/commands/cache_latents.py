"""Precompute VAE latents and text embeddings of pair, single-image or long-caption shards,
resumably.

Usage: align data cache-latents --model <dir|hub id|preset> --shards <shards...> --out <dir>
       [--resolution R] [--flip] [--batch-size 16] [--device auto|cpu|cuda[:i]]
       [--dtype auto|fp32|bf16] [--store-dtype float16|float32] [--schema auto|pair|single|long]
       [--shard-size 1000] [--seed 0]

Each image is resized on its shorter side and center-cropped to ``--resolution`` (default: the
model's native size), exactly as the data modules' validation transform does, and encoded by the
model's VAE; the stored tensor is the VAE's DiagonalGaussian parameters (mean and logvar), so
training still samples the latent as it does from images. ``--flip`` also stores the moments of the
flipped crop (for ``flip_prob > 0``). The stripped caption is encoded by the model's prompt encoder
(SD1.5: CLIP last hidden state; SDXL: both penultimate states and the pooled projection) and the
empty prompt's encoding is saved once as ``uncond.npy`` for caption dropout. The output schema is
documented in ``align.data.cached``; samples keep their keys and order, and unusable samples (bad
json, undecodable image, empty caption) are skipped and counted. Ties are kept (the data module
drops them at load time, as it does for image shards).

``--dtype bf16`` (the default on CUDA) encodes under autocast. Resumable through the shard writer's
manifest (``align.data.writer``); an output folder made with another model, resolution, flip
setting, dtype or from other inputs is refused without touching it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from align.data.cached import (
    EMBEDS,
    PAIR_MOMENTS,
    PAIR_MOMENTS_FLIP,
    POOLED,
    SINGLE_MOMENTS,
    SINGLE_MOMENTS_FLIP,
    STORE_DTYPES,
    UNCOND,
    UNCOND_POOLED,
    model_fingerprint,
    npy_bytes,
)
from align.data.commands._verify_cache import CACHE_SETTINGS, META_PROBLEM
from align.data.commands.verify import detect_schema
from align.data.convert_helpers import add_writer_args, command_parser, fail
from align.data.images import decode_caption, decode_image, decode_json
from align.data.pipeline import SkipSample
from align.data.schema import CACHE_COMMAND, PAIR_IMAGE_KEYS, SINGLE_IMAGE_KEY, cache_settings
from align.data.tars import READ_ERRORS, expand_shard_paths, iter_tar_groups, iter_tar_samples
from align.data.transforms import Augmented, ImageTransform
from align.data.writer import Skip, Unit, file_identity, load_manifest, run_command, write_shards

# settings that change the cached values: an existing output made with other values is refused
CHECKED = ("schema", *(k for k in CACHE_SETTINGS if k != "model"))


@dataclass
class Prepared:
    """A row ready to encode: its images' crops, in the source's image order."""

    key: str
    meta: dict
    caption: str
    crops: list[Augmented]
    txt: bytes | None = None


class Encoder:
    """The model's VAE and prompt encoder on ``device``, encoding batches."""

    def __init__(self, components, settings: dict, device: torch.device, batch_size: int):
        from align.models.prompts import build_prompt_encoder

        self.settings, self.device, self.batch_size = settings, device, max(1, batch_size)
        self.vae = components.vae.to(device).eval()
        self.prompt_encoder = build_prompt_encoder(components, "clip").to(device).eval()
        self.transform = ImageTransform(settings["resolution"], crop="center", flip_prob=0.0)
        self.flip = settings["flip"]
        self.store = STORE_DTYPES[settings["store_dtype"]]
        dtype = {"bf16": torch.bfloat16}.get(settings["dtype"])
        self.autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

    @torch.no_grad()
    def moments(self, pixels: list[torch.Tensor]) -> list[np.ndarray]:
        out = []
        for start in range(0, len(pixels), self.batch_size):
            batch = pixels[start : start + self.batch_size]
            chunk = torch.stack(batch).to(self.device, self.vae.dtype)
            with self.autocast:
                params = self.vae.encode(chunk).latent_dist.parameters
            out.extend(params.float().cpu().numpy().astype(self.store))
        return out

    @torch.no_grad()
    def prompts(self, captions: list[str]) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
        embeds, pooled = [], []
        for start in range(0, len(captions), self.batch_size):
            with self.autocast:
                cond = self.prompt_encoder(captions[start : start + self.batch_size])
            embeds.extend(cond.embeds.float().cpu().numpy().astype(self.store))
            if cond.pooled is not None:
                pooled.extend(cond.pooled.float().cpu().numpy().astype(self.store))
        return embeds, (pooled or None)

    def prepare(self, key: str, sample: dict, schema: str) -> Prepared | Skip:
        """Checks as the data modules do (same skip reasons), then decodes and crops the images."""
        txt = sample.get("txt") if schema == "long" else None
        try:
            if schema == "long":
                caption = decode_caption(txt)
                try:  # a long caption's json is optional metadata, kept as it is
                    meta = json.loads(sample["json"]) if sample.get("json") else {}
                except (ValueError, UnicodeDecodeError):
                    meta = {}
                meta = meta if isinstance(meta, dict) else {"source_json": meta}
            else:
                meta = decode_json(sample)
                problem = META_PROBLEM[schema](meta)
                if problem:
                    return Skip(problem)
                caption = decode_caption(meta["caption"])
            keys = PAIR_IMAGE_KEYS if schema == "pair" else (SINGLE_IMAGE_KEY,)
            images = [decode_image(sample, k) for k in keys]
        except SkipSample as skip:
            return Skip(skip.reason)
        return Prepared(key, meta, caption, [self.transform(image) for image in images], txt)

    def encode(self, rows: list, schema: str):
        """Encode the prepared rows of ``rows`` together; one writer item per row, in order."""
        ready = [r for r in rows if isinstance(r, Prepared)]
        pixels = [c.pixels for r in ready for c in r.crops]
        if self.flip:
            pixels += [p.flip(-1) for p in pixels]
        moments = self.moments(pixels) if pixels else []
        half = len(moments) // 2 if self.flip else len(moments)
        plain, flipped = iter(moments[:half]), iter(moments[half:])
        embeds, pooled = self.prompts([r.caption for r in ready]) if ready else ([], None)
        texts = iter(zip(embeds, pooled or [None] * len(embeds)))
        pair = schema == "pair"
        names = PAIR_MOMENTS if pair else (SINGLE_MOMENTS,)
        flip_names = (PAIR_MOMENTS_FLIP if pair else (SINGLE_MOMENTS_FLIP,)) if self.flip else ()
        for row in rows:
            if not isinstance(row, Prepared):
                yield row
                continue
            cache = {
                **{k: self.settings[k] for k in CACHE_SETTINGS},
                "crop": "center",
                "original_size": [list(c.original_size) for c in row.crops],
                "crop_top_left": [list(c.crop_top_left) for c in row.crops],
            }
            embed, pooled_embed = next(texts)
            out = {
                "__key__": row.key,
                "json": {**row.meta, "cache": cache},
                EMBEDS: npy_bytes(embed),
            }
            if pooled_embed is not None:
                out[POOLED] = npy_bytes(pooled_embed)
            out.update({name: npy_bytes(next(plain)) for name in names})
            out.update({name: npy_bytes(next(flipped)) for name in flip_names})
            if row.txt is not None:
                out["txt"] = row.txt
            yield out


_ENCODER: Encoder | None = None  # set by main; the writer runs in this process (workers=1)


def convert_shard(payload: tuple, need):
    """Writer converter: the samples of one input shard, encoded in batches."""
    path, schema = payload
    encoder = _ENCODER
    per_row = 2 if schema == "pair" else 1
    pending, images = [], 0
    for row, (key, sample) in enumerate(iter_tar_samples(path)):
        if not need(row):
            pending.append(None)
        else:
            item = encoder.prepare(key, sample, schema)
            pending.append(item)
            images += per_row if isinstance(item, Prepared) else 0
        if images >= encoder.batch_size:
            yield from encoder.encode(pending, schema)
            pending, images = [], 0
    yield from encoder.encode(pending, schema)


def plan(paths: list[str], schema: str) -> tuple[list[Unit], dict]:
    """One unit per input shard (its samples counted from the tar headers); unreadable shards."""
    units, skipped = [], {}
    for path in paths:
        try:
            rows = sum(1 for _ in iter_tar_groups(path))
        except READ_ERRORS as exn:
            name = f"{os.path.basename(path)}: {type(exn).__name__}"
            skipped.setdefault("unreadable_tar", []).append(name)
            continue
        if rows:
            units.append(Unit(os.path.basename(path), rows, (path, schema)))
    return units, skipped


def refused_settings(out: Path, settings: dict) -> str | None:
    """Why an existing cache in ``out`` cannot be resumed with ``settings``, or None."""
    manifest = load_manifest(out) if out.is_dir() else None
    if manifest is None:
        return None
    old = cache_settings(manifest)
    if old is None:
        return (
            f"{out} holds shards written by `align data {manifest.get('command')}`, "
            "not a latent cache"
        )
    differ = [
        f"{k}: {old.get(k)!r} there, {settings[k]!r} now"
        for k in CHECKED
        if old.get(k) != settings[k]
    ]
    if differ:
        return (
            f"{out} is a cache made with other settings ({'; '.join(differ)}; model there: "
            f"{old.get('model')!r}). Nothing was changed; use another --out, or delete the "
            "folder to start over."
        )
    return None


def _write_npy(path: Path, array) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(npy_bytes(array))
    os.replace(tmp, path)


def main(argv: list[str]) -> int:
    parser = command_parser(
        CACHE_COMMAND, __doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--model", required=True, help="local diffusers folder, hub id, or preset (tiny, ...)")
    add("--shards", nargs="+", required=True, help="input shards: paths, globs, braces, folders")
    add("--resolution", type=int, default=0, help="square crop size in px (default: the model's)")
    add("--flip", action="store_true", help="also store the latents of the flipped crop")
    add("--batch-size", type=int, default=16, help="images per VAE forward (and captions per text)")
    add("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    add(
        "--dtype",
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="compute dtype: bf16 autocast (default on CUDA) or fp32 (default on CPU)",
    )
    add(
        "--store-dtype",
        choices=tuple(STORE_DTYPES),
        default="float16",
        help="dtype of the stored tensors (default float16; see align.data.cached)",
    )
    add("--schema", choices=("auto", "pair", "single", "long"), default="auto")
    add(
        "--threads",
        type=int,
        default=0,
        help="CPU threads for torch (default: torch's; 1 is fastest per core on a busy machine)",
    )
    add("--seed", type=int, default=0, help="weights seed of a preset model (the module's seed)")
    add_writer_args(parser, prefix="cache", workers=False)  # encodes in this process
    args = parser.parse_args(argv)

    paths, missing = expand_shard_paths(args.shards)
    if missing or not paths:
        return fail(f"no shard matches {', '.join(missing or args.shards)}")
    schema = args.schema
    if schema == "auto":
        first = next(iter_tar_samples(paths[0], fields=lambda field: False), None)
        schema = detect_schema(set(first[1])) if first else None
    if schema is None:
        return fail(f"cannot tell the schema of {paths[0]} (pair, single or long): pass --schema")
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if args.device == "auto" else args.device)
    dtype = args.dtype if args.dtype != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    from align.models import ModelSourceError, load_components

    started = time.time()
    try:
        components = load_components(args.model, seed=args.seed)
    except ModelSourceError as exn:
        return fail(str(exn))
    settings = {
        "model": args.model,
        "model_fingerprint": model_fingerprint(components.vae, components.text_encoders),
        "resolution": args.resolution or components.resolution,
        "flip": args.flip,
        "dtype": dtype,
        "store_dtype": args.store_dtype,
        "prompt_encoder": "clip",
        "schema": schema,
    }
    out = Path(args.out)
    refusal = refused_settings(out, settings)
    if refusal:
        return fail(f"refusing to write: {refusal}")

    global _ENCODER
    _ENCODER = Encoder(components, settings, device, args.batch_size)
    if not args.no_progress:
        print(
            f"{CACHE_COMMAND}: {args.model} ({settings['model_fingerprint']}) on {device} "
            f"({dtype}), {settings['resolution']} px, {schema} shards, loaded in "
            f"{time.time() - started:.1f} s",
            file=sys.stderr,
        )
    units, files_skipped = plan(paths, schema)
    source = {"inputs": [file_identity(p) for p in paths], "cache": settings}
    # the empty prompt (for caption dropout), and a first VAE call: lazy imports and kernel choice
    # happen here, not inside the conversion's rows/s
    embeds, pooled = _ENCODER.prompts([""])
    _ENCODER.moments([torch.zeros(3, settings["resolution"], settings["resolution"])])

    def write():
        summary = write_shards(
            out,
            command=CACHE_COMMAND,
            prefix=args.prefix,
            source=source,
            units=units,
            convert=convert_shard,
            shard_size=args.shard_size,
            workers=1,
            progress=not args.no_progress,
            files_skipped=files_skipped,
            extra={"model": args.model, "device": str(device), "dtype": dtype},
        )
        _write_npy(out / UNCOND, embeds[0][None])
        if pooled is not None:
            _write_npy(out / UNCOND_POOLED, pooled[0][None])
        return summary

    return run_command(write)
