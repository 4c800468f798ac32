"""The LongAlign demo at toy scale: long captions put every fact past CLIP's 77 tokens, the shards
follow the long-caption schema, SFT trains through configs/demo/sft.yaml with either encoder, and
truncation really loses the late facts while segment encoding keeps them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from align.demo import world
from align.demo.base import BaseConfig, build_base
from align.demo.judge import judge, parse_caption
from align.demo.longalign import (
    cells_beyond,
    long_eval_captions,
    resolve_encoder,
    write_long_caption_shards,
)
from align.models.tokenizer import build_clip_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_clip_tokenizer()


@pytest.fixture(scope="module")
def toy_base(tmp_path_factory):
    return build_base(
        tmp_path_factory.mktemp("la") / "base",
        BaseConfig(scenes=64, vae_steps=2, vae_batch=4, unet_steps=2, unet_batch=4, threads=1),
    )


def test_every_long_sentence_starts_past_token_77(tok):
    preamble = " ".join(world.LONG_PREAMBLE)
    assert parse_caption(preamble) == []  # the preamble states no facts
    assert len(tok(preamble, add_special_tokens=False).input_ids) >= 77
    rng = np.random.default_rng(0)
    for n in range(1, 5):
        cells = sorted(rng.choice(4, n, replace=False).tolist())
        scene = tuple(world.Obj(c, "blue", "triangle") for c in cells)
        text = world.caption(scene, long=True)
        assert cells_beyond(text, tok) == set(cells)
        ids = tok(text, truncation=True, max_length=77).input_ids  # what a 77-token encoder reads
        assert parse_caption(tok.decode(ids, skip_special_tokens=True)) == []
    # short captions, and a long sentence placed early, are within the limit
    assert (
        cells_beyond("a red square in the top left. a green square in the bottom right.", tok)
        == set()
    )
    early = world.sentence(world.Obj(1, "red", "square"), long=True)
    late = world.sentence(world.Obj(2, "green", "triangle"), long=True)
    assert cells_beyond(" ".join([early, *world.LONG_PREAMBLE, late]), tok) == {2}


def test_long_eval_captions_are_distinct_and_held_out():
    caps = long_eval_captions(8, seed=3)
    assert len(set(caps)) == 8 and all(len(parse_caption(c)) == 1 for c in caps)
    assert long_eval_captions(8, seed=3) == caps
    other = long_eval_captions(8, seed=3, exclude=caps[:4])
    assert not set(other) & set(caps[:4])


def test_shards_are_long_caption_schema_with_true_long_captions(tmp_path, tok):
    from align.data.longcaption import LongCaptionDataModule

    held_out = long_eval_captions(8, seed=3)
    shards = write_long_caption_shards(
        tmp_path / "long", n_scenes=24, seed=0, exclude=held_out, shards=4
    )
    assert len(list(shards.glob("longcaption-*.tar"))) == 4
    dm = LongCaptionDataModule(
        sources=str(shards),
        batch_size=6,
        resolution=world.SIZE,
        num_workers=0,
        batches_per_epoch=4,
        shuffle_buffer=0,
    )
    seen = 0
    for batch in dm.train_dataloader():
        assert batch["pixel_values"].shape[1:] == (3, world.SIZE, world.SIZE)
        px = (
            ((batch["pixel_values"] + 1) * 127.5)
            .round()
            .clamp(0, 255)
            .byte()
            .permute(0, 2, 3, 1)
            .numpy()
        )
        for image, cap in zip(px, batch["caption"]):
            assert len(tok(cap).input_ids) > 77 and cap not in held_out
            assert cells_beyond(cap, tok) == {o.cell for o in parse_caption(cap)}
            assert judge(image, cap).value == 1.0  # the caption is true of its image
            seen += 1
    assert seen == 24


def test_truncation_drops_the_late_facts_and_segments_keep_them(toy_base):
    from align.models import load_components

    parts = load_components(str(toy_base))
    a = world.caption((world.Obj(0, "red", "square"),), long=True)
    b = world.caption((world.Obj(3, "blue", "triangle"),), long=True)
    with torch.no_grad():
        trunc = resolve_encoder(parts, "truncate")([a, b]).embeds
        seg = resolve_encoder(parts, "segment")([a, b]).embeds
        short = resolve_encoder(parts, "truncate")(
            ["a red square in the top left.", "a blue triangle in the bottom right."]
        ).embeds
    # the 77-token encoder cannot tell the two captions apart (same tokens; rows of a batched matmul
    # may round differently, so not bitwise: seen once on a loaded machine)
    torch.testing.assert_close(trunc[0], trunc[1], rtol=0, atol=1e-5)
    assert not torch.allclose(seg[0], seg[1])
    assert not torch.allclose(short[0], short[1])
    assert seg.shape[1] > 77 and trunc.shape[1] == 77


def read_weights(folder):
    from safetensors.torch import load_file

    return {k: v for f in sorted(folder.rglob("*.safetensors")) for k, v in load_file(f).items()}


@pytest.mark.parametrize("encoder,lora_rank", [("segment", 4), ("truncate", 0)])
def test_sft_config_trains_two_steps_and_judges_late_facts(
    toy_base, tmp_path, monkeypatch, encoder, lora_rank
):
    import json

    from align.demo.run import DemoConfig, batch_of, fit, job_args, steps

    art = tmp_path / "art"
    (art / "prefs").mkdir(parents=True)
    (art / "base").symlink_to(toy_base)
    held_out = long_eval_captions(2, seed=3)
    write_long_caption_shards(art / "prefs" / "long", n_scenes=16, seed=0, exclude=held_out)
    (art / "judge.json").write_text(
        json.dumps(
            {
                "short": [],
                "long": held_out,
                "seeds": [0, 1],
                "every": 0,
                "curve_seeds": 2,
                "steps": 2,
                "guidance": 4.0,
            }
        )
    )
    monkeypatch.setenv("ALIGN_DEMO", str(art))
    cfg = DemoConfig(
        artifacts=str(art),
        fit_args={
            "*": steps(2)
            + batch_of(4)
            + [
                "--model.init_args.lora_rank",
                str(lora_rank),
                "--model.init_args.optimizer.init_args.lr",
                "1e-3",
            ]
        },
    )
    method = f"sft-{encoder}"
    fit(job_args(cfg, method, 0))
    run = art / "runs" / method / "seed0"
    assert (run / "hparams.yaml").is_file() and (run / "config.yaml").is_file()
    spec = json.loads((run / "export/final/prompt_encoder.json").read_text())
    assert spec["kind"] == ("segment" if encoder == "segment" else "clip")
    after = read_weights(run / "export/final")
    before = read_weights(toy_base / "unet")
    if lora_rank:  # a LoRA on the cross-attention projections only, moved off its zero init
        lora = {k: v for k, v in after.items() if "lora.up" in k}  # diffusers: up = B
        assert (
            lora
            and all(".attn2." in k for k in after)
            and any(v.abs().sum() > 0 for v in lora.values())
        )
        # reproducible: the same seed trains the same weights (no clock-seeded shuffle buffer)
        fit(job_args(cfg, method, 0) + ["--trainer.logger.init_args.version", "again"])
        again = read_weights(art / "runs" / method / "again" / "export/final")
        assert after.keys() == again.keys() and all(
            torch.equal(v, again[k]) for k, v in after.items()
        )
    else:  # full fine-tuning: the UNet moved
        unet = read_weights(run / "export/final/unet")
        assert unet.keys() == before.keys() and any(
            not torch.equal(v, before[k]) for k, v in unet.items()
        )
    judged = json.loads((run / "judge.json").read_text())
    assert 0.0 <= judged["final"] <= 1.0 and len(judged["caption_scores"]) == 2
    assert np.load(run / "judge_images.npy").shape == (4, world.SIZE, world.SIZE, 3)
