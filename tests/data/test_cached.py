"""Latent caches (``align data cache-latents``, ``align.data.cached``): schema, resume and refusals,
and that training on a cache computes the same loss as training on the images it was made from."""

import io
import json
import math
import random

import numpy as np
import pytest
import torch
from helpers import run_cache, write_tar
from PIL import Image

from align.data.cached import (
    decode_cached_pair,
    decode_cached_single,
    model_fingerprint,
    npy_tensor,
)
from align.data.kto import KTODataModule, decode_single
from align.data.pickapic import PickAPicDataModule, decode_pair
from align.data.pipeline import SkipSample
from align.data.tars import iter_tar_samples
from align.data.transforms import ImageTransform
from align.modules import DPOModule
from align.modules.kto import KTOModule

RES = 32  # the tiny preset's native resolution


def noise_jpeg(seed: int, size: tuple[int, int]) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


SIZES = [(48, 36), (36, 48), (40, 40), (50, 33)]


def pair(i: int, label_0: float, caption: str | None = None, second_size=None) -> dict:
    meta = {
        "caption": caption or f"pair number {i}",
        "label_0": label_0,
        "label_1": 1.0 - label_0,
        "image_0_uid": f"u{i}a",
        "image_1_uid": f"u{i}b",
    }
    size = SIZES[i % len(SIZES)]
    return {
        "__key__": f"p{i:03d}",
        "jpg_0.jpg": noise_jpeg(2 * i, size),
        "jpg_1.jpg": noise_jpeg(2 * i + 1, second_size or size),
        "json": json.dumps(meta).encode(),
    }


def single(i: int, label: bool) -> dict:
    meta = {"caption": f"single image {i}", "label": label, "image_uid": f"s{i}"}
    return {
        "__key__": f"s{i:03d}",
        "jpg": noise_jpeg(100 + i, SIZES[i % len(SIZES)]),
        "json": json.dumps(meta).encode(),
    }


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """Two pair shards: winners on either side, a tie, differently sized images in one pair,
    a corrupt image."""
    root = tmp_path_factory.mktemp("cache-src")
    src = root / "pairs"
    src.mkdir()
    first = [
        pair(0, 1.0),
        pair(1, 0.0),
        pair(2, 0.5),
        pair(3, 0.0, second_size=(40, 40)),
        {**pair(4, 1.0), "jpg_1.jpg": b"\xff\xd8 not a jpeg"},
    ]
    second = [pair(5, 1.0), pair(6, 0.0), pair(7, 1.0), pair(8, 0.0)]
    write_tar(src / "pairs-000000.tar", first)
    write_tar(src / "pairs-000001.tar", second)
    out = root / "pairs-cache"
    assert (
        run_cache(
            "--model",
            "tiny",
            "--shards",
            src,
            "--out",
            out,
            "--flip",
            "--store-dtype",
            "float32",
            "--batch-size",
            4,
        )
        == 0
    )
    return src, out


def cached_with(pairs, model: str):
    src, out = pairs
    dest = out.parent / f"pairs-cache-{model}"
    assert (
        run_cache("--model", model, "--shards", src, "--out", dest, "--store-dtype", "float32") == 0
    )
    return src, dest


@pytest.fixture(scope="module")
def xl_pairs(pairs):
    """The same pairs cached with the SDXL-shaped preset (pooled embeddings, time ids)."""
    return cached_with(pairs, "tiny-xl")


@pytest.fixture(scope="module")
def sd3_pairs(pairs):
    """The same pairs cached with the SD3-shaped preset (16 latent channels, CLIP + T5 rows)."""
    return cached_with(pairs, "tiny-sd3")


@pytest.fixture(scope="module")
def flux_pairs(pairs):
    """The same pairs cached with the FLUX-shaped preset (T5 rows, CLIP-L pooled)."""
    return cached_with(pairs, "tiny-flux")


@pytest.fixture(scope="module")
def singles(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache-kto")
    src = root / "singles"
    src.mkdir()
    write_tar(src / "kto-000000.tar", [single(i, i % 3 == 0) for i in range(8)])
    out = root / "kto-cache"
    assert (
        run_cache("--model", "tiny", "--shards", src, "--out", out, "--store-dtype", "float32") == 0
    )
    return src, out


def samples_by_key(folder) -> dict:
    return {
        key: sample
        for path in sorted(folder.glob("*.tar"))
        for key, sample in iter_tar_samples(str(path))
    }


def perturbed(module):
    """Policy != reference, so the loss depends on latents and conditioning
    (at init it is log 2 whatever they are)."""
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in module.unet.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return module.train()


def forbid_encoders(module, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("an encoder ran on the cached path")

    monkeypatch.setattr(module.vae, "encode", boom)
    monkeypatch.setattr(module.prompt_encoder, "forward", boom)


def test_cache_schema_summary_and_byte_identical_resume(pairs):
    src, out = pairs
    cached = samples_by_key(out)
    # order and keys kept, ties kept
    assert sorted(cached) == [f"p{i:03d}" for i in range(9) if i != 4]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["written"] == 8 and summary["skipped"] == {"corrupt_image": 1}
    sample = cached["p001"]
    assert set(sample) == {
        "json",
        "embeds.npy",
        "moments_0.npy",
        "moments_1.npy",
        "moments_0_flip.npy",
        "moments_1_flip.npy",
    }
    meta = json.loads(sample["json"])
    assert meta["label_0"] == 0.0 and meta["image_0_uid"] == "u1a"  # the source json, source order
    cache = meta["cache"]
    assert cache["resolution"] == RES and cache["crop"] == "center" and cache["flip"] is True
    assert cache["original_size"] == [[48, 36], [48, 36]]  # (h, w) of a 36 x 48 (w x h) image
    assert cache["crop_top_left"] == [[(round(48 * RES / 36) - RES) // 2, 0]] * 2
    moments = npy_tensor(sample["moments_0.npy"])
    # tiny VAE: 2x down
    assert moments.shape == (8, RES // 2, RES // 2) and moments.dtype == torch.float32
    assert npy_tensor(sample["embeds.npy"]).shape == (77, 32)
    assert npy_tensor((out / "uncond.npy").read_bytes()).shape == (1, 77, 32)

    manifest = json.loads((out / "manifest.json").read_text())
    before = {name: rec["sha256"] for name, rec in manifest["shards"].items()}
    (out / "cache-000001.tar").unlink()  # an interrupted run: one shard missing
    assert (
        run_cache(
            "--model",
            "tiny",
            "--shards",
            src,
            "--out",
            out,
            "--flip",
            "--store-dtype",
            "float32",
            "--batch-size",
            4,
        )
        == 0
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["shards_kept"] == 1 and summary["shards_written"] == 1
    after = json.loads((out / "manifest.json").read_text())["shards"]
    # same device and batch size: same bytes
    assert {name: rec["sha256"] for name, rec in after.items()} == before


@pytest.mark.parametrize("change", [["--resolution", 24], ["--seed", 1], []])
def test_an_output_made_with_other_settings_is_refused_untouched(pairs, change):
    src, out = pairs
    before = (out / "manifest.json").read_bytes()
    # [] = no --flip
    flags = ["--flip", "--store-dtype", "float32"] if change else ["--store-dtype", "float32"]
    assert run_cache("--model", "tiny", "--shards", src, "--out", out, *flags, *change) == 2
    assert (out / "manifest.json").read_bytes() == before


def test_cached_pairs_decode_as_the_images_do(pairs):
    """Winner first, ties, crops and flips (drawn from the same random numbers): the cached moments
    are the VAE's moments of exactly the pixels ``decode_pair`` produces."""
    src, out = pairs
    from align.models import load_components

    vae = load_components("tiny").vae.eval()
    raw, cached = samples_by_key(src), samples_by_key(out)
    transform = ImageTransform(RES, crop="center", flip_prob=0.5)
    flips, got_moments, pixels = set(), [], []
    for key in cached:
        if json.loads(raw[key]["json"])["label_0"] == 0.5:
            with pytest.raises(SkipSample, match="tie"):
                decode_cached_pair(cached[key], drop_ties=True)
            assert decode_cached_pair(cached[key], drop_ties=False)["label"] == 0.5
            continue
        for seed in range(3):
            for joint in (True, False):
                image = decode_pair(raw[key], transform, True, joint, rng=random.Random(seed))
                got = decode_cached_pair(cached[key], True, 0.5, joint, rng=random.Random(seed))
                assert torch.equal(got["original_size"], image["original_size"])
                assert torch.equal(got["crop_top_left"], image["crop_top_left"])
                assert got["caption"] == image["caption"] and got["label"] == image["label"]
                unflipped = decode_cached_pair(cached[key], True, 0.0, joint)["latent_moments"]
                flips.update(
                    not torch.equal(got["latent_moments"][i], unflipped[i]) for i in (0, 1)
                )
                got_moments.append(got["latent_moments"])
                pixels.append(image["pixel_values"])
    with torch.no_grad():
        want = vae.encode(torch.cat(pixels)).latent_dist.parameters
    torch.testing.assert_close(torch.cat(got_moments), want, rtol=1e-5, atol=1e-5)
    assert flips == {True, False}


def _batches(image_dm, cached_dm, n: int = 1):
    images, cached = next(iter(image_dm.val_dataloader())), next(iter(cached_dm.val_dataloader()))
    assert images["key"] == cached["key"] and len(images["key"]) == n
    return images, cached


@pytest.mark.parametrize(
    "model,dropout",
    [
        ("tiny", 0.0),
        ("tiny", 0.5),
        ("tiny-xl", 0.5),
        pytest.param("tiny-sd3", 0.5, marks=pytest.mark.slow),  # caching + 2 modules: ~15 s
        pytest.param("tiny-flux", 0.0, marks=pytest.mark.slow),
    ],
)
def test_dpo_loss_is_the_same_on_the_cache_and_on_the_images(request, model, dropout, monkeypatch):
    fixture = {"tiny-xl": "xl_pairs", "tiny-sd3": "sd3_pairs", "tiny-flux": "flux_pairs"}
    src, out = request.getfixturevalue(fixture.get(model, "pairs"))
    common = dict(batch_size=4, resolution=RES, num_workers=0, val_batches=1, flip_prob=0.0)
    images, cached = _batches(
        PickAPicDataModule(str(src), val_shards=str(src), **common),
        PickAPicDataModule(str(out), val_shards=str(out), cached=True, **common),
        n=4,
    )
    channels = 32 if model in ("tiny-sd3", "tiny-flux") else 8  # mean and log-variance
    assert "pixel_values" not in cached
    assert cached["latent_moments"].shape == (8, channels, RES // 2, RES // 2)
    if model == "tiny-xl":
        assert cached["pooled_embeds"].shape == (4, 32) and cached["uncond_pooled"].shape == (1, 32)
        assert torch.equal(cached["original_size"], images["original_size"])
        assert torch.equal(cached["crop_top_left"], images["crop_top_left"])
    beta = 100.0 if channels == 32 else 5000.0  # the flow configs' beta: velocity errors are larger
    module = perturbed(DPOModule(model=model, caption_dropout=dropout, beta=beta))
    # the module's host stream decides the dropout: this seed drops some captions and keeps others
    seed = 3
    module.seed_streams("train", seed)
    dropped = [c == "" for c in module.drop_captions(images["caption"])]
    assert (0 < sum(dropped) < len(dropped)) if dropout else not any(dropped)

    import align.modules.dpo
    from align.objectives.dpo import dpo_loss

    errors = []

    def spy(policy, ref, beta):  # training_step's errors, to compare them too
        errors.append((policy, ref))
        return dpo_loss(policy, ref, beta=beta)

    monkeypatch.setattr(align.modules.dpo, "dpo_loss", spy)

    def loss(batch):
        module.seed_streams("train", seed)
        return module.training_step(batch, 0)

    expected = loss(images)
    forbid_encoders(module, monkeypatch)
    got = loss(cached)
    (policy, ref), (policy_c, ref_c) = errors
    assert not torch.allclose(policy, ref)  # a perturbed policy: the loss is not the constant log 2
    assert abs(expected.item() - math.log(2)) > 1e-4
    torch.testing.assert_close(policy_c, policy, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ref_c, ref, rtol=1e-5, atol=1e-7)
    # beta 5000 turns the errors' 1e-7 tolerance into ~2.5e-4 of logit: the loss agrees to that
    assert math.isclose(got.item(), expected.item(), rel_tol=1e-3)


def test_kto_loss_is_the_same_on_the_cache_and_on_the_images(singles, monkeypatch):
    src, out = singles
    common = dict(batch_size=8, resolution=RES, num_workers=0, val_batches=1, flip_prob=0.0)
    images, cached = _batches(
        KTODataModule(str(src), val_shards=str(src), **common),
        KTODataModule(str(out), val_shards=str(out), cached=True, **common),
        n=8,
    )
    assert torch.equal(images["desirable"], cached["desirable"]) and images["desirable"].any()
    # beta 50, not 5000: with a perturbed policy the paper's beta saturates the sigmoid and hides
    # differences
    module = perturbed(
        KTOModule(model="tiny", beta=50.0, reference_point="mismatched", caption_dropout=0.3)
    )
    import align.modules.kto
    from align.objectives.kto import kto_loss

    seen = []

    def spy(policy, ref, desirable, **kwargs):
        seen.append((policy, ref, kwargs["reference_point"]))
        return kto_loss(policy, ref, desirable, **kwargs)

    monkeypatch.setattr(align.modules.kto, "kto_loss", spy)
    module.seed_streams("train", 1)  # drops some of the 8 captions at p = 0.3, keeps others
    dropped = [c == "" for c in module.drop_captions(images["caption"])]
    assert 0 < sum(dropped) < len(dropped)

    def loss(batch):
        module.seed_streams("train", 1)
        return module.training_step(batch, 0)

    expected = loss(images)
    forbid_encoders(module, monkeypatch)
    got = loss(cached)
    assert 1e-3 < expected.item() < 0.999  # not saturated
    for image_side, cached_side in zip(*seen):
        torch.testing.assert_close(cached_side, image_side, rtol=1e-5, atol=1e-7)
    assert math.isclose(got.item(), expected.item(), rel_tol=1e-5)


def test_single_decoder_mirrors_decode_single(singles):
    src, out = singles
    raw, cached = samples_by_key(src), samples_by_key(out)
    transform = ImageTransform(RES, crop="center", flip_prob=0.0)
    for key in raw:
        label = json.loads(raw[key]["json"])["label"]
        assert decode_cached_single(cached[key], want=not label) is None
        got, image = (
            decode_cached_single(cached[key], want=label),
            decode_single(raw[key], transform, want=label),
        )
        assert got["desirable"] == image["desirable"] and got["caption"] == image["caption"]
        assert torch.equal(got["original_size"], image["original_size"])
    with pytest.raises(SkipSample, match="missing_moments"):
        decode_cached_single({k: v for k, v in cached[key].items() if k != "moments.npy"})
    with pytest.raises(SkipSample, match="not_cached"):
        decode_cached_single(raw[key])


def test_data_modules_refuse_caches_they_cannot_use(pairs, singles):
    pair_src, pair_cache = pairs
    kto_src, kto_cache = singles
    common = dict(resolution=RES, num_workers=0, cached=True)
    with pytest.raises(ValueError, match="cached at 32 px"):
        PickAPicDataModule(str(pair_cache), **{**common, "resolution": 64})
    with pytest.raises(ValueError, match="without --flip"):
        KTODataModule(str(kto_cache), flip_prob=0.5, **common)
    with pytest.raises(ValueError, match="not a latent cache"):
        PickAPicDataModule(str(pair_src), **common)
    with pytest.raises(ValueError, match="caches pair shards"):
        KTODataModule(str(pair_cache), flip_prob=0.0, **common)
    dm = PickAPicDataModule(str(pair_cache), flip_prob=0.5, crop="random", batch_size=2, **common)
    batch = next(iter(dm.train_dataloader()))
    other = DPOModule(model="tiny", seed=1)  # other random weights: another VAE and text encoder
    with pytest.raises(ValueError, match="cached from model .* with another VAE"):
        other.pair_errors(batch)
    same = DPOModule(model="tiny")
    assert batch["cache_fingerprint"] == model_fingerprint(same.vae, same.components.text_encoders)
    assert same.pair_errors(batch)[0].shape == (4,)


def test_long_caption_shards_cache_with_their_txt_caption(tmp_path):
    # far beyond CLIP's 77 tokens: CLIP truncates, as the image path does
    long_caption = "A long caption. " * 40
    write_tar(
        tmp_path / "long-000000.tar",
        [
            {
                "__key__": f"l{i}",
                "jpg": noise_jpeg(200 + i, SIZES[i]),
                "txt": f"{i} {long_caption}".encode(),
                "json": json.dumps({"source": "sam"}).encode(),
            }
            for i in range(3)
        ]
        + [{"__key__": "l9", "jpg": noise_jpeg(9, (40, 40)), "txt": b"   ", "json": b"{}"}],
    )
    out = tmp_path / "cache"
    assert run_cache("--model", "tiny", "--shards", tmp_path / "long-000000.tar", "--out", out) == 0
    assert json.loads((out / "summary.json").read_text())["skipped"] == {"empty_caption": 1}
    cached = samples_by_key(out)
    assert set(cached["l1"]) == {"txt", "json", "embeds.npy", "moments.npy"}
    got = decode_cached_single(cached["l1"], source="sam")
    assert (
        got["caption"] == f"1 {long_caption}".strip()
        and got["source"] == "sam"
        and "desirable" not in got
    )
    assert (
        got["latent_moments"].dtype == torch.float16
        and json.loads(cached["l1"]["json"])["source"] == "sam"
    )
    from align.models import load_components
    from align.models.prompts import build_prompt_encoder

    with torch.no_grad():
        want = build_prompt_encoder(load_components("tiny"), "clip")([got["caption"]]).embeds[0]
    # float16 storage
    torch.testing.assert_close(got["prompt_embeds"].float(), want, rtol=2e-3, atol=2e-3)


def test_sft_loss_is_the_same_on_a_long_caption_cache_and_on_the_images(tmp_path, monkeypatch):
    from align.data.longcaption import LongCaptionDataModule
    from align.data.synthetic_long import write_synthetic_longcaption
    from align.modules import SFTModule

    src = tmp_path / "long"
    write_synthetic_longcaption(src, 4, 1, RES, 0)
    out = tmp_path / "long-cache"
    assert (
        run_cache("--model", "tiny", "--shards", src, "--out", out, "--store-dtype", "float32") == 0
    )
    common = dict(batch_size=4, resolution=RES, num_workers=0, val_batches=1, flip_prob=0.0)
    images, cached = _batches(
        LongCaptionDataModule(str(src), val_sources=str(src), **common),
        LongCaptionDataModule(str(out), val_sources=str(out), cached=True, **common),
        n=4,
    )
    module = SFTModule(model="tiny", caption_dropout=0.0).train()

    def loss(batch):
        module.seed_streams("train", 0)
        return module.training_step(batch, 0)

    expected = loss(images)
    forbid_encoders(module, monkeypatch)
    assert math.isclose(loss(cached).item(), expected.item(), rel_tol=1e-5)
