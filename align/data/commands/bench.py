"""Throughput of the pair data pipeline, on image shards and on latent caches
(docs/benchmarks_data.md).

    align data bench images --out DIR --size 512 --pairs 256
    align data bench cache --out DIR --shape sd15 --pairs 256 [--flip]
    align data bench measure --shards DIR --resolution 512 --workers 1 [--cached] [--flip-prob 0.5]
    align data bench convert --model sd15-arch --resolution 512 --shards SHARD --pairs 2

``images`` writes pair shards of photo-like JPEGs (multi-octave colour noise fields with grain,
quality 95; about the entropy of real photographs, so decoding costs what it does on Pick-a-Pic; the
sizes are printed). ``cache`` writes a latent cache in the exact ``align data cache-latents`` format
(manifest, uncond.npy, the same members and json) holding random tensors of SD1.5 (512 px: moments
8x64x64, embeds 77x768) or SDXL (1024 px: moments 8x128x128, embeds 77x2048, pooled 1280) shapes in
float16: decoding ``.npy`` costs the same whatever the values, and making a real cache of this size
needs a GPU. ``measure`` runs ``PickAPicDataModule``'s training loader (shuffle, crop, flip,
collate, the DataLoader's worker processes) and prints, after warm-up batches (worker start-up
excluded), pairs/s of wall time and pairs per CPU-second of the main and worker processes (user +
system time from /proc): the per-core rate, robust to a busy machine. ``convert`` times
``align data cache-latents``' encoder (one thread by default) in CPU-seconds per pair.
"""

from __future__ import annotations

import argparse
import io
import os
import json
import time
from pathlib import Path

import numpy as np

from align.commands import doc_summary

SHAPES = {
    "sd15": {"resolution": 512, "latent": 64, "embeds": (77, 768), "pooled": None},
    "sdxl": {"resolution": 1024, "latent": 128, "embeds": (77, 2048), "pooled": 1280},
}


def photo_like(size: int, rng: np.random.Generator) -> np.ndarray:
    """An RGB uint8 image with structure at every scale
    (1/f-like spectrum) and sensor-like grain."""
    from PIL import Image

    image = np.zeros((size, size, 3), np.float32)
    cells = 2
    while cells <= size // 2:
        field = rng.normal(0, 1, (cells, cells, 3)).astype(np.float32)
        up = np.stack(
            [
                np.asarray(
                    Image.fromarray(field[..., c]).resize((size, size), Image.Resampling.BICUBIC)
                )
                for c in range(3)
            ],
            -1,
        )
        image += up * (cells**-0.7)
        cells *= 2
    image = (image - image.mean()) / (image.std() + 1e-6) * 55 + 128 + rng.normal(0, 4, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def make_images(out: Path, size: int, pairs: int, per_shard: int = 64, seed: int = 0) -> None:
    import webdataset as wds
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pool = []
    for _ in range(
        16
    ):  # 16 distinct images, reused: decoding cost is per image, not per distinct image
        buf = io.BytesIO()
        Image.fromarray(photo_like(size, rng)).save(buf, format="JPEG", quality=95)
        pool.append(buf.getvalue())
    for shard in range(0, pairs, per_shard):
        with wds.TarWriter(str(out / f"pairs-{shard // per_shard:06d}.tar")) as sink:
            for i in range(shard, min(pairs, shard + per_shard)):
                meta = {
                    "caption": f"a photograph number {i}",
                    "label_0": float(i % 2),
                    "label_1": float(1 - i % 2),
                }
                sink.write(
                    {
                        "__key__": f"{i:09d}",
                        "jpg_0.jpg": pool[(2 * i) % 16],
                        "jpg_1.jpg": pool[(2 * i + 1) % 16],
                        "json": json.dumps(meta).encode(),
                    }
                )
    sizes = [len(b) for b in pool]
    print(
        f"{pairs} pairs of {size} px JPEGs, {np.mean(sizes) / 1024:.0f} KiB per image (min "
        f"{min(sizes) // 1024}, "
        f"max {max(sizes) // 1024})"
    )


def make_cache(
    out: Path, shape: str, pairs: int, flip: bool, per_shard: int = 64, seed: int = 0
) -> None:
    from align.data.cached import (
        COMMAND,
        EMBEDS,
        PAIR_MOMENTS,
        PAIR_MOMENTS_FLIP,
        POOLED,
        UNCOND,
        UNCOND_POOLED,
        npy_bytes,
    )
    from align.data.writer import Unit, write_shards

    spec = SHAPES[shape]
    rng = np.random.default_rng(seed)
    lat, res = spec["latent"], spec["resolution"]
    settings = {
        "model": f"synthetic-{shape}",
        "model_fingerprint": "synthetic",
        "resolution": res,
        "flip": flip,
        "dtype": "bf16",
        "store_dtype": "float16",
        "prompt_encoder": "clip",
        "schema": "pair",
    }

    def tensor(*shape_):
        return rng.normal(0, 1, shape_).astype(np.float16)

    def convert(payload, need):
        for i in range(*payload):
            cache = {
                **settings,
                "crop": "center",
                "original_size": [[res, res]] * 2,
                "crop_top_left": [[0, 0]] * 2,
            }
            sample = {
                "__key__": f"{i:09d}",
                EMBEDS: npy_bytes(tensor(*spec["embeds"])),
                "json": {
                    "caption": f"a photograph number {i}",
                    "label_0": float(i % 2),
                    "label_1": float(1 - i % 2),
                    "cache": cache,
                },
            }
            for name in PAIR_MOMENTS + (PAIR_MOMENTS_FLIP if flip else ()):
                sample[name] = npy_bytes(tensor(8, lat, lat))
            if spec["pooled"]:
                sample[POOLED] = npy_bytes(tensor(spec["pooled"]))
            yield sample

    units = [
        Unit(f"u{k}", min(per_shard, pairs - k), (k, min(pairs, k + per_shard)))
        for k in range(0, pairs, per_shard)
    ]
    write_shards(
        out,
        command=COMMAND,
        prefix="cache",
        source={"inputs": [], "cache": settings},
        units=units,
        convert=convert,
        shard_size=per_shard,
        progress=False,
        log=lambda *a: None,
    )
    (out / UNCOND).write_bytes(npy_bytes(tensor(1, *spec["embeds"])))
    if spec["pooled"]:
        (out / UNCOND_POOLED).write_bytes(npy_bytes(tensor(1, spec["pooled"])))
    per_pair = sum(p.stat().st_size for p in out.glob("*.tar")) / pairs
    print(f"{pairs} cached {shape} pairs, {per_pair / 1024:.0f} KiB per pair on disk")


def measure(
    shards: str,
    resolution: int,
    workers: int,
    batch_size: int,
    batches: int,
    cached: bool,
    flip_prob: float,
) -> float:
    import torch

    from align.data.pickapic import PickAPicDataModule

    torch.set_num_threads(1)
    dm = PickAPicDataModule(
        shards,
        batch_size=batch_size,
        resolution=resolution,
        crop="center" if cached else "random",
        flip_prob=flip_prob,
        num_workers=workers,
        batches_per_epoch=batches + 2 * workers,
        shuffle_buffer=64,
        cached=cached,
    )
    loader = iter(dm.train_dataloader())
    for _ in range(2 * workers):  # every worker started and past its first batch
        next(loader)
    pids = [os.getpid(), *(w.pid for w in getattr(loader, "_workers", []))]
    main0, workers0, start = cpu_seconds(pids[:1]), cpu_seconds(pids[1:]), time.perf_counter()
    for _ in range(batches):
        next(loader)
    wall = time.perf_counter() - start
    main_cpu, worker_cpu = cpu_seconds(pids[:1]) - main0, cpu_seconds(pids[1:]) - workers0
    pairs = batches * batch_size
    print(
        f"{'cached' if cached else 'images'} {shards} res {resolution} workers {workers}: "
        f"{pairs / wall:.1f} pairs/s "
        f"wall; {pairs / (main_cpu + worker_cpu):.1f} pairs per CPU-second (workers "
        f"{worker_cpu:.1f} CPU-s, "
        f"main {main_cpu:.1f} CPU-s, in {wall:.1f} s; load average {os.getloadavg()[0]:.2f})"
    )
    return pairs / wall


def convert_rate(model: str, resolution: int, shards: str, pairs: int) -> None:
    """CPU-seconds per pair of ``align data cache-latents``' encoder
    (VAE, text, npy) on this process's threads."""
    import torch

    from align.data.commands.cache_latents import Encoder
    from align.data.tars import iter_tar_samples
    from align.models import load_components

    settings = {
        "model": model,
        "model_fingerprint": "-",
        "resolution": resolution,
        "flip": False,
        "dtype": "fp32",
        "store_dtype": "float16",
        "prompt_encoder": "clip",
        "schema": "pair",
    }
    encoder = Encoder(load_components(model), settings, torch.device("cpu"), 2 * pairs)
    encoder.prompts([""])
    encoder.moments(
        [torch.zeros(3, 64, 64)]
    )  # lazy imports and first-call set-up, outside the timing
    rows = [
        encoder.prepare(k, s, "pair")
        for i, (k, s) in enumerate(iter_tar_samples(shards))
        if i < pairs
    ]
    clock = time.process_time()
    encoder.moments([p for r in rows for p in r.pixels])
    vae = time.process_time() - clock
    clock = time.process_time()
    encoder.prompts([r.caption for r in rows])
    text = time.process_time() - clock
    clock, wall = time.process_time(), time.perf_counter()
    list(encoder.encode(rows, "pair"))
    full, wall = time.process_time() - clock, time.perf_counter() - wall
    print(
        f"{model} {resolution} px, {len(rows)} pairs, {torch.get_num_threads()} thread(s): "
        f"VAE {vae / (2 * len(rows)):.1f} CPU-s per image, text {text / len(rows):.2f} CPU-s per "
        "caption; full encode (VAE + text + npy) "
        f"{full / len(rows):.1f} CPU-s per pair ({wall:.1f} s wall; load average "
        f"{os.getloadavg()[0]:.2f})"
    )


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of these processes so far (Linux /proc), in seconds."""
    total = 0.0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="align data bench", description=doc_summary(__doc__))
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("images")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--pairs", type=int, default=256)
    p = sub.add_parser("cache")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--shape", choices=tuple(SHAPES), default="sd15")
    p.add_argument("--pairs", type=int, default=256)
    p.add_argument("--flip", action="store_true")
    p = sub.add_parser("measure")
    p.add_argument("--shards", required=True)
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--cached", action="store_true")
    p.add_argument("--flip-prob", type=float, default=0.5)
    p = sub.add_parser("convert")
    p.add_argument("--model", default="sd15-arch")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument(
        "--shards", required=True, help="one pair shard (its first --pairs pairs are encoded)"
    )
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.what == "images":
        make_images(args.out, args.size, args.pairs)
    elif args.what == "cache":
        make_cache(args.out, args.shape, args.pairs, args.flip)
    elif args.what == "convert":
        import torch

        torch.set_num_threads(args.threads)
        convert_rate(args.model, args.resolution, args.shards, args.pairs)
    else:
        measure(
            args.shards,
            args.resolution,
            args.workers,
            args.batch_size,
            args.batches,
            args.cached,
            args.flip_prob,
        )
    return 0
