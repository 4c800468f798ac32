"""Fréchet distance between the feature statistics of two image sets (FID), with pluggable features.

Feature extractors (``build_feature_extractor(spec)``):

* ``inception`` / ``inception:<weights.pth>``: the standard FID Inception-v3 (TF-ported 2015-12-05
  weights, pool3, 2048-d) through torchmetrics' ``NoTrainInceptionV3``; needs the ``torch-fidelity``
  package, and the weights file ``weights-inception-2015-12-05-6726825d.pth`` where nothing can be
  downloaded.
* ``clip:<dir or hub id>``: the projected image embedding of a transformers CLIP model (FID_CLIP,
  Kynkäänniemi et al. 2023), preprocessed by its own PIL-backend image processor; works from local
  weights (the tiny CLIP of ``align.rewards.tiny`` in tests and ``make eval``).

References (``reference_stats``): an ``.npz`` of statistics, a directory of real images, or
webdataset shards (a ``.tar`` or a directory of them; every image field, e.g. both images of a
Pick-a-Pic pair): ``make eval`` takes the synthetic validation shard the tiny model trained against.
A reference that is (or holds) an image set being scored is refused (``check_reference_is_real``).

Statistics are accumulated in float64 and saved as ``.npz`` with ``mu``, ``sigma`` (the pytorch-fid
/ clean-fid key names), ``n`` and ``features`` (the extractor spec, checked on reuse so that
statistics of different features are never compared). The distance is
``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1^1/2 S2 S1^1/2)^1/2)`` with symmetric
eigendecompositions (exact for PSD matrices, no scipy needed).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from align.data.tars import READ_ERRORS, iter_tar_samples
from align.data.images import load_image
from align.extras import require
from align.rewards.hf_clip import HFClip

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class FIDError(ValueError):
    """FID cannot be computed as asked (missing reference, mismatched features, too few images)."""


@dataclass
class FeatureStats:
    mu: np.ndarray
    sigma: np.ndarray
    n: int
    features: str

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(
            path, mu=self.mu, sigma=self.sigma, n=np.array(self.n), features=np.array(self.features)
        )
        return path

    @classmethod
    def load(cls, path: str | Path) -> "FeatureStats":
        data = np.load(path, allow_pickle=False)
        if "mu" not in data or "sigma" not in data:
            raise FIDError(f"{path}: not an FID statistics file (needs 'mu' and 'sigma')")
        return cls(
            mu=data["mu"].astype(np.float64),
            sigma=data["sigma"].astype(np.float64),
            n=int(data["n"]) if "n" in data else -1,
            features=str(data["features"]) if "features" in data else "unknown",
        )


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """The Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = (np.atleast_2d(np.asarray(s, np.float64)) for s in (sigma1, sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise FIDError(f"feature dimensions differ: {mu1.shape} vs {mu2.shape}")
    w, v = np.linalg.eigh((sigma1 + sigma1.T) / 2.0)
    root = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T  # sigma1^1/2
    middle = root @ sigma2 @ root
    eig = np.clip(np.linalg.eigvalsh((middle + middle.T) / 2.0), 0.0, None)
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.sqrt(eig).sum())
    return max(value, 0.0)


def fid_from_stats(a: FeatureStats, b: FeatureStats) -> float:
    if a.features != b.features and "unknown" not in (a.features, b.features):
        raise FIDError(
            f"cannot compare statistics of different features: {a.features!r} vs {b.features!r}"
        )
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


class ClipFeatures:
    """A feature extractor: RGB PIL images -> (N, D) float64 features, named by ``spec``."""

    def __init__(self, source: str, device: str | torch.device = "cpu"):
        self.spec = f"clip:{source}"
        self.clip = HFClip.load("fid", source, source, vision_only=True).eval().to(device)
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(self, images):
        pixels = self.clip.preprocess_pil(images).to(self.device)
        return self.clip.image_features(pixels).double().cpu().numpy()


class InceptionFeatures:
    def __init__(self, weights: str | None = None, device: str | torch.device = "cpu"):
        # torchmetrics' Inception is torch-fidelity's; --fid-features clip:<dir> needs neither
        require("torch_fidelity", "eval", "FID with Inception features")
        fid_module = require("torchmetrics.image.fid", "eval", "FID with Inception features")

        if weights is not None and not Path(weights).is_file():
            raise FIDError(f"FID Inception weights not found: {weights}")
        self.spec = "inception"
        # pool3 (2048-d) of the TF-ported FID Inception-v3, as torchmetrics' FID computes it
        inception = fid_module.NoTrainInceptionV3("inception-v3-compat", ["2048"], weights)
        self.model = inception.eval().to(device)
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(self, images):
        arrays = [
            torch.from_numpy(np.array(im.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1)
            for im in images
        ]
        sizes = {tuple(a.shape) for a in arrays}
        if len(sizes) > 1:  # the extractor resizes to 299 itself; a batch needs one size
            size = arrays[0].shape[1:]
            resize = lambda a: F.interpolate(a[None].float(), size=size, mode="bilinear")[0]
            arrays = [resize(a).round().clamp(0, 255).to(torch.uint8) for a in arrays]
        batch = torch.stack(arrays).to(self.device)
        return self.model(batch).reshape(len(images), -1).double().cpu().numpy()


FeatureExtractor = ClipFeatures | InceptionFeatures


def build_feature_extractor(spec: str, device: str | torch.device = "cpu") -> FeatureExtractor:
    kind, _, arg = spec.partition(":")
    if kind == "inception":
        return InceptionFeatures(arg or None, device=device)
    if kind == "clip":
        if not arg:
            raise FIDError("clip features need a model: clip:<local CLIP dir or hub id>")
        return ClipFeatures(arg, device=device)
    raise FIDError(f"unknown FID features {spec!r} (inception[:weights.pth] or clip:<dir>)")


def compute_stats(
    images: Iterable[Image.Image | Path], extractor: FeatureExtractor, batch_size: int = 32
) -> FeatureStats:
    """Mean and covariance (float64, unbiased) of the features of ``images`` (PIL images or paths;
    unreadable paths are left out, logged)."""
    n, total, outer = 0, None, None

    def flush(batch):
        nonlocal n, total, outer
        feats = extractor(batch).astype(np.float64)
        total = feats.sum(0) if total is None else total + feats.sum(0)
        outer = feats.T @ feats if outer is None else outer + feats.T @ feats
        n += feats.shape[0]

    batch = []
    for item in images:
        if isinstance(item, Image.Image):
            image = item.convert("RGB")
        else:
            image, why = load_image(Path(item))
            if image is None:
                log.warning("FID: unreadable image %s left out (%s)", item, why)
                continue
        batch.append(image)
        if len(batch) == batch_size:
            flush(batch)
            batch = []
    if batch:
        flush(batch)
    if n < 2:
        raise FIDError(f"FID needs at least 2 images, got {n}")
    mu = total / n
    sigma = (outer - n * np.outer(mu, mu)) / (n - 1)
    return FeatureStats(mu=mu, sigma=sigma, n=n, features=extractor.spec)


def shard_images(shards: Sequence[Path]) -> Iterable[Image.Image]:
    """Every image of webdataset shards (fields ``jpg``, ``png``, ``jpg_0.jpg``, ...: both images of
    a pair); an unreadable image is left out, logged."""
    for shard in shards:
        for key, sample in _shard_samples(shard):
            for name, data in sample.items():
                if data is None:  # not an image field: not read
                    continue
                try:
                    with Image.open(io.BytesIO(data)) as image:
                        yield image.convert("RGB")
                except READ_ERRORS as err:
                    log.warning("FID: unreadable %s:%s.%s left out (%r)", shard, key, name, err)


def _shard_samples(shard: Path):
    try:
        is_image = lambda field: "." + field.rsplit(".", 1)[-1].lower() in IMAGE_SUFFIXES
        yield from iter_tar_samples(str(shard), fields=is_image)
    except READ_ERRORS as err:  # a damaged reference is the user's to fix: one line, no traceback
        raise FIDError(f"FID reference shard {shard} cannot be read: {err}") from err


def reference_stats(
    reference: str | Path, extractor: FeatureExtractor, batch_size: int = 32
) -> FeatureStats:
    """Statistics of ``reference``: an ``.npz`` statistics file, a directory of images, or
    webdataset shards of real images (a ``.tar`` file, or a directory of them)."""
    path = Path(reference).expanduser()
    if path.is_file() and path.suffix == ".tar":
        return compute_stats(shard_images([path]), extractor, batch_size=batch_size)
    if path.is_file():
        stats = FeatureStats.load(path)
        if stats.features not in (extractor.spec, "unknown"):
            raise FIDError(
                f"{path} holds statistics of {stats.features!r} features, not {extractor.spec!r}"
            )
        return stats
    if path.is_dir():
        images = (p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        files = sorted(p for p in images if p.is_file() and not p.name.endswith(".partial.png"))
        if files:
            return compute_stats(files, extractor, batch_size=batch_size)
        shards = sorted(path.rglob("*.tar"))
        if shards:
            return compute_stats(shard_images(shards), extractor, batch_size=batch_size)
        raise FIDError(
            f"FID reference {path} holds no images ({', '.join(IMAGE_SUFFIXES)}) and no .tar shards"
        )
    raise FIDError(
        f"FID reference {path} does not exist (a directory of images, .tar shards or an .npz "
        "statistics file)"
    )


def check_reference_is_real(reference: str | Path, image_sets: dict[str, Path]) -> None:
    """Refuse a reference that is (or holds) one of the sets being scored: FID against the images
    themselves says nothing (the baseline's FID would be 0 by construction)."""
    ref = Path(reference).expanduser().resolve()
    for label, folder in image_sets.items():
        folder = Path(folder).expanduser().resolve()
        if folder == ref or ref in folder.parents:
            relation = "is" if folder == ref else "holds"
            raise FIDError(
                f"the FID reference {reference} {relation} the {label} image set {folder}: FID "
                "must compare samples with real images (e.g. the validation shards), not samples"
            )
