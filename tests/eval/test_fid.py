"""FID: the Fréchet distance itself, a set against itself, growth with added noise,
statistics files."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from align.eval.fid import (
    FeatureStats,
    FIDError,
    build_feature_extractor,
    compute_stats,
    fid_from_stats,
    frechet_distance,
    reference_stats,
    shard_images,
)


def test_frechet_distance_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    v1, v2 = rng.uniform(0.5, 2, 5), rng.uniform(0.5, 2, 5)
    # diagonal covariances: |mu1 - mu2|^2 + sum (sqrt(v1) - sqrt(v2))^2
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-9)
    # a full covariance against itself, rotated: 0; scaled by 4: tr(S)
    # (2 - 1)^2 ... = tr(S + 4S - 2*2S) = tr(S)
    a = rng.normal(size=(5, 5))
    s = a @ a.T
    assert frechet_distance(mu1, s, mu1, s) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance(mu1, s, mu1, 4 * s) == pytest.approx(np.trace(s), rel=1e-8)


@pytest.fixture(scope="module")
def clip_features(tiny_rewards):
    return build_feature_extractor(f"clip:{tiny_rewards['clip']}")


def smooth_images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(
            (np.clip(rng.normal(0.5, 0.2, (8, 8, 3)), 0, 1) * 255).astype(np.uint8)
        ).resize((64, 64), Image.BICUBIC)
        for _ in range(n)
    ]


def add_noise(images, sigma, seed=1):
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(
            (np.clip(np.asarray(im) / 255 + rng.normal(0, sigma, (64, 64, 3)), 0, 1) * 255).astype(
                np.uint8
            )
        )
        for im in images
    ]


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_noise(clip_features):
    images = smooth_images(40)
    ref = compute_stats(images, clip_features, batch_size=16)
    assert ref.n == 40 and ref.features == clip_features.spec
    scale = np.trace(ref.sigma)
    assert fid_from_stats(ref, compute_stats(images, clip_features, batch_size=7)) < 1e-6 * scale
    fids = [
        fid_from_stats(ref, compute_stats(add_noise(images, s), clip_features))
        for s in (0.03, 0.1, 0.3)
    ]
    assert fids[0] > 1e-4 * scale
    assert fids[0] < fids[1] < fids[2], fids


def test_reference_directory_and_stats_file(clip_features, tmp_path):
    folder = tmp_path / "ref"
    folder.mkdir()
    for i, im in enumerate(smooth_images(6)):
        im.save(folder / f"{i}.png")
    (folder / "broken.png").write_bytes(b"not a png")
    stats = reference_stats(folder, clip_features)
    assert stats.n == 6  # the unreadable file is left out
    path = stats.save(tmp_path / "ref.npz")
    again = reference_stats(path, clip_features)
    np.testing.assert_allclose(again.mu, stats.mu)
    np.testing.assert_allclose(again.sigma, stats.sigma)
    FeatureStats(stats.mu, stats.sigma, 6, "inception").save(tmp_path / "other.npz")
    with pytest.raises(FIDError, match="inception"):
        reference_stats(tmp_path / "other.npz", clip_features)
    with pytest.raises(FIDError, match="does not exist"):
        reference_stats(tmp_path / "nope", clip_features)
    with pytest.raises(FIDError, match="at least 2"):
        compute_stats(smooth_images(1), clip_features)


def test_unknown_features():
    with pytest.raises(FIDError, match="unknown FID features"):
        build_feature_extractor("vgg")


def test_reference_shards(clip_features, pair_shards, tmp_path):
    """Real images from webdataset shards: a .tar, or a folder of them (both images of a pair)."""
    one = reference_stats(pair_shards / "pairs-000000.tar", clip_features)
    every = reference_stats(pair_shards, clip_features)
    assert one.n == 32 and every.n == 128
    assert not np.allclose(one.mu, every.mu)
    broken = tmp_path / "broken.tar"
    broken.write_bytes(b"not a tar archive")
    with pytest.raises(FIDError, match="broken.tar cannot be read"):
        reference_stats(broken, clip_features)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FIDError, match="no .tar shards"):
        reference_stats(empty, clip_features)


def test_a_scored_set_is_no_reference(tmp_path):
    from align.eval.fid import check_reference_is_real

    sets = {"run": tmp_path / "samples" / "run", "baseline": tmp_path / "samples" / "base"}
    check_reference_is_real(tmp_path / "real", sets)  # elsewhere: fine
    with pytest.raises(FIDError, match="is the baseline image set"):
        check_reference_is_real(tmp_path / "samples" / "base" / ".", sets)
    with pytest.raises(FIDError, match="holds the run image set"):
        check_reference_is_real(tmp_path / "samples", sets)


def test_an_unreadable_reference_image_is_left_out_and_logged(tmp_path, caplog):
    good = io.BytesIO()
    Image.new("RGB", (8, 8)).save(good, "png")
    with tarfile.open(tmp_path / "ref.tar", "w") as tar:
        for name, data in (("a.png", good.getvalue()), ("b.png", b"not an image")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with caplog.at_level("WARNING", logger="align.eval.fid"):
        assert len(list(shard_images([tmp_path / "ref.tar"]))) == 1
    assert "ref.tar:b.png left out" in caplog.text
