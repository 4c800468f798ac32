"""Throughput of the pair data pipeline, on image shards and on latent caches
(docs/benchmarks_data.md has the figures).

    align data bench images --out DIR --size 512 --pairs 256
    align data bench cache --out DIR --shape sd15 --pairs 256 [--flip]
    align data bench measure --shards DIR --resolution 512 --workers 1 [--cached] [--flip-prob 0.5]
    align data bench convert --model sd15-arch --resolution 512 --shards SHARD --pairs 2

``images``: pair shards of photo-like JPEGs (about the entropy of real photographs: decoding costs
what it does on Pick-a-Pic). ``cache``: a latent cache in the exact ``align data cache-latents``
format holding random float16 tensors of SD1.5 or SDXL shapes (decoding ``.npy`` costs the same
whatever the values; a real cache of this size needs a GPU). ``measure``: ``PickAPicDataModule``'s
training loader after warm-up batches, in pairs/s of wall time and pairs per CPU-second of the main
and worker processes (the per-core rate, robust to a busy machine). ``convert``: ``align data
cache-latents``' encoder in CPU-seconds per pair.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import time
from pathlib import Path

import numpy as np

from align.commands import doc_summary

SHAPES = {
    "sd15": {"resolution": 512, "latent": 64, "embeds": (77, 768), "pooled": None},
    "sdxl": {"resolution": 1024, "latent": 128, "embeds": (77, 2048), "pooled": 1280},
}
PER_SHARD = 64


def photo_like(size: int, rng: np.random.Generator) -> np.ndarray:
    """An RGB uint8 image with structure at every scale
    (1/f-like spectrum) and sensor-like grain."""
    from PIL import Image

    def upsampled(field: np.ndarray) -> np.ndarray:
        return np.asarray(Image.fromarray(field).resize((size, size), Image.Resampling.BICUBIC))

    image = np.zeros((size, size, 3), np.float32)
    cells = 2
    while cells <= size // 2:
        field = rng.normal(0, 1, (cells, cells, 3)).astype(np.float32)
        image += np.stack([upsampled(field[..., c]) for c in range(3)], -1) * (cells**-0.7)
        cells *= 2
    image = (image - image.mean()) / (image.std() + 1e-6) * 55 + 128 + rng.normal(0, 4, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def pair_meta(i: int) -> dict:
    """Pair ``i``'s caption and labels (alternately the first and the second image preferred)."""
    return {
        "caption": f"a photograph number {i}",
        "label_0": float(i % 2),
        "label_1": float(1 - i % 2),
    }


def cache_settings(model: str, fingerprint: str, resolution: int, flip: bool, dtype: str) -> dict:
    """The settings a latent cache records (``align data cache-latents``)."""
    return {
        "model": model,
        "model_fingerprint": fingerprint,
        "resolution": resolution,
        "flip": flip,
        "dtype": dtype,
        "store_dtype": "float16",
        "prompt_encoder": "clip",
        "schema": "pair",
    }


def make_images(out: Path, size: int, pairs: int, seed: int = 0) -> None:
    import webdataset as wds
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    # 16 distinct images, reused: decoding cost is per image, not per distinct image
    pool = []
    for _ in range(16):
        buf = io.BytesIO()
        Image.fromarray(photo_like(size, rng)).save(buf, format="JPEG", quality=95)
        pool.append(buf.getvalue())
    for shard in range(0, pairs, PER_SHARD):
        with wds.TarWriter(str(out / f"pairs-{shard // PER_SHARD:06d}.tar")) as sink:
            for i in range(shard, min(pairs, shard + PER_SHARD)):
                sink.write(
                    {
                        "__key__": f"{i:09d}",
                        "jpg_0.jpg": pool[(2 * i) % 16],
                        "jpg_1.jpg": pool[(2 * i + 1) % 16],
                        "json": json.dumps(pair_meta(i)).encode(),
                    }
                )
    sizes = [len(b) for b in pool]
    print(
        f"{pairs} pairs of {size} px JPEGs, {np.mean(sizes) / 1024:.0f} KiB per image "
        f"(min {min(sizes) // 1024}, max {max(sizes) // 1024})"
    )


def make_cache(out: Path, shape: str, pairs: int, flip: bool, seed: int = 0) -> None:
    from align.data import cached as C
    from align.data.writer import Unit, write_shards

    spec = SHAPES[shape]
    rng = np.random.default_rng(seed)
    lat, res = spec["latent"], spec["resolution"]
    settings = cache_settings(f"synthetic-{shape}", "synthetic", res, flip, "bf16")

    def npy(*shape_) -> bytes:
        return C.npy_bytes(rng.normal(0, 1, shape_).astype(np.float16))

    def convert(payload, need):
        cache = {
            **settings,
            "crop": "center",
            "original_size": [[res, res]] * 2,
            "crop_top_left": [[0, 0]] * 2,
        }
        for i in range(*payload):
            sample = {
                "__key__": f"{i:09d}",
                C.EMBEDS: npy(*spec["embeds"]),
                "json": {**pair_meta(i), "cache": cache},
            }
            for name in C.PAIR_MOMENTS + (C.PAIR_MOMENTS_FLIP if flip else ()):
                sample[name] = npy(8, lat, lat)
            if spec["pooled"]:
                sample[C.POOLED] = npy(spec["pooled"])
            yield sample

    units = [
        Unit(f"u{k}", min(PER_SHARD, pairs - k), (k, min(pairs, k + PER_SHARD)))
        for k in range(0, pairs, PER_SHARD)
    ]
    write_shards(
        out,
        command=C.CACHE_COMMAND,
        prefix="cache",
        source={"inputs": [], "cache": settings},
        units=units,
        convert=convert,
        shard_size=PER_SHARD,
        progress=False,
        log=lambda *a: None,
    )
    (out / C.UNCOND).write_bytes(npy(1, *spec["embeds"]))
    if spec["pooled"]:
        (out / C.UNCOND_POOLED).write_bytes(npy(1, spec["pooled"]))
    per_pair = sum(p.stat().st_size for p in out.glob("*.tar")) / pairs
    print(f"{pairs} cached {shape} pairs, {per_pair / 1024:.0f} KiB per pair on disk")


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of these processes so far (Linux /proc), in seconds."""
    total = 0.0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


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
    main_pid, worker_pids = [os.getpid()], [w.pid for w in getattr(loader, "_workers", [])]
    main0, workers0, start = cpu_seconds(main_pid), cpu_seconds(worker_pids), time.perf_counter()
    for _ in range(batches):
        next(loader)
    wall = time.perf_counter() - start
    main_cpu = cpu_seconds(main_pid) - main0
    worker_cpu = cpu_seconds(worker_pids) - workers0
    pairs = batches * batch_size
    print(
        f"{'cached' if cached else 'images'} {shards} res {resolution} workers {workers}: "
        f"{pairs / wall:.1f} pairs/s wall; {pairs / (main_cpu + worker_cpu):.1f} pairs per "
        f"CPU-second (workers {worker_cpu:.1f} CPU-s, main {main_cpu:.1f} CPU-s, in {wall:.1f} s; "
        f"load average {os.getloadavg()[0]:.2f})"
    )
    return pairs / wall


def convert_rate(model: str, resolution: int, shards: str, pairs: int, threads: int) -> None:
    """CPU-seconds per pair of ``align data cache-latents``' encoder
    (VAE, text, npy) on ``threads`` threads of this process."""
    import torch

    from align.data.commands.cache_latents import Encoder
    from align.data.tars import iter_tar_samples
    from align.models import load_components

    torch.set_num_threads(threads)
    settings = cache_settings(model, "-", resolution, False, "fp32")
    encoder = Encoder(load_components(model), settings, torch.device("cpu"), 2 * pairs)
    # lazy imports and first-call set-up, outside the timing
    encoder.prompts([""])
    encoder.moments([torch.zeros(3, 64, 64)])
    rows = [
        encoder.prepare(k, s, "pair")
        for i, (k, s) in enumerate(iter_tar_samples(shards))
        if i < pairs
    ]

    def cpu_time(work) -> float:
        clock = time.process_time()
        work()
        return time.process_time() - clock

    vae = cpu_time(lambda: encoder.moments([c.pixels for r in rows for c in r.crops]))
    text = cpu_time(lambda: encoder.prompts([r.caption for r in rows]))
    wall = time.perf_counter()
    full = cpu_time(lambda: list(encoder.encode(rows, "pair")))
    wall = time.perf_counter() - wall
    n = len(rows)
    print(
        f"{model} {resolution} px, {n} pairs, {torch.get_num_threads()} thread(s): "
        f"VAE {vae / (2 * n):.1f} CPU-s per image, text {text / n:.2f} CPU-s per caption; "
        f"full encode (VAE + text + npy) {full / n:.1f} CPU-s per pair ({wall:.1f} s wall; "
        f"load average {os.getloadavg()[0]:.2f})"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="align data bench", description=doc_summary(__doc__))
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("images")
    p.set_defaults(run=make_images)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--pairs", type=int, default=256)
    p = sub.add_parser("cache")
    p.set_defaults(run=make_cache)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--shape", choices=tuple(SHAPES), default="sd15")
    p.add_argument("--pairs", type=int, default=256)
    p.add_argument("--flip", action="store_true")
    p = sub.add_parser("measure")
    p.set_defaults(run=measure)
    p.add_argument("--shards", required=True)
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--cached", action="store_true")
    p.add_argument("--flip-prob", type=float, default=0.5)
    p = sub.add_parser("convert")
    p.set_defaults(run=convert_rate)
    p.add_argument("--model", default="sd15-arch")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument(
        "--shards", required=True, help="one pair shard (its first --pairs pairs are encoded)"
    )
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    args = vars(parser.parse_args(argv))
    del args["what"]
    args.pop("run")(**args)  # each command's options are its function's parameters
    return 0
