"""The LongAlign demo at toy scale: long captions put every fact past CLIP's 77 tokens, the shards follow the
long-caption schema, SFT trains through the real module with either encoder, and truncation really loses the
late facts while segment encoding keeps them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from align.demo import world
from align.demo.base import BaseConfig, build_base
from align.demo.judge import judge, parse_caption
from align.demo.longalign import (CROSS_ATTENTION, cells_beyond, evaluate_long, long_eval_captions, resolve_encoder, train_sft,
                                  write_long_caption_shards)
from align.models.tokenizer import build_clip_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_clip_tokenizer()


@pytest.fixture(scope="module")
def toy_base(tmp_path_factory):
    return build_base(tmp_path_factory.mktemp("la") / "base",
                      BaseConfig(scenes=64, vae_steps=2, vae_batch=4, unet_steps=2, unet_batch=4))


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
    assert cells_beyond("a red square in the top left. a green square in the bottom right.", tok) == set()
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
    shards = write_long_caption_shards(tmp_path / "long", n_scenes=24, seed=0, exclude=held_out, shards=4)
    assert len(list(shards.glob("longcaption-*.tar"))) == 4
    dm = LongCaptionDataModule(sources=str(shards), batch_size=6, resolution=world.SIZE, num_workers=0,
                               batches_per_epoch=4, shuffle_buffer=0)
    seen = 0
    for batch in dm.train_dataloader():
        assert batch["pixel_values"].shape[1:] == (3, world.SIZE, world.SIZE)
        px = ((batch["pixel_values"] + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
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
        short = resolve_encoder(parts, "truncate")(["a red square in the top left.",
                                                     "a blue triangle in the bottom right."]).embeds
    # the 77-token encoder cannot tell the two captions apart (same tokens; rows of a batched matmul may round
    # differently, so not bitwise: seen once on a loaded machine)
    torch.testing.assert_close(trunc[0], trunc[1], rtol=0, atol=1e-5)
    assert not torch.allclose(seg[0], seg[1])
    assert not torch.allclose(short[0], short[1])
    assert seg.shape[1] > 77 and trunc.shape[1] == 77


@pytest.mark.parametrize("encoder,lora_rank", [("segment", 4), ("truncate", 0)])
def test_train_sft_two_steps_and_evaluate(toy_base, tmp_path, encoder, lora_rank):
    from align.models import load_components

    held_out = long_eval_captions(2, seed=3)
    shards = write_long_caption_shards(tmp_path / "long", n_scenes=16, seed=0, exclude=held_out)
    before = load_components(str(toy_base)).unet.state_dict()
    module = train_sft(toy_base, shards, encoder, seed=0, steps=2, lr=1e-3, batch_size=4, run_dir=tmp_path / "runs",
                       lora_rank=lora_rank, lora_targets=CROSS_ATTENTION if lora_rank else None)
    assert type(module.prompt_encoder).__name__ == ("SegmentTextEncoder" if encoder == "segment"
                                                    else "CLIPPromptEncoder")
    after = module.unet.state_dict()
    if lora_rank:  # a LoRA on the cross-attention projections only, moved off its zero init; base weights kept
        lora = {k: v for k, v in after.items() if "lora_B" in k}
        assert lora and all(".attn2." in k for k in lora) and any(v.abs().sum() > 0 for v in lora.values())
        assert all(torch.equal(v, before[k.replace(".base_layer", "")]) for k, v in after.items() if "lora" not in k)
    else:  # full fine-tuning: the UNet moved
        assert any(not torch.equal(v, before[k]) for k, v in after.items())
    if lora_rank:  # reproducible: the same seed trains the same weights (no clock-seeded shuffle buffer)
        again = train_sft(toy_base, shards, encoder, seed=0, steps=2, lr=1e-3, batch_size=4, lora_rank=lora_rank,
                          lora_targets=CROSS_ATTENTION).unet.state_dict()
        assert all(torch.equal(v, again[k]) for k, v in after.items() if "lora" in k)
    res = evaluate_long(module.components, module.unet, module.prompt_encoder, held_out, seeds=[0, 1], steps=2)
    assert res["images"].shape == (4, world.SIZE, world.SIZE, 3)
    assert res["cells"] == [{o.cell for o in parse_caption(c)} for c in held_out]
    assert 0.0 <= res["score"] <= 1.0 and len(res["scores"]) == 4
    assert (tmp_path / "runs" / f"longalign-{encoder}" / "seed0" / "hparams.yaml").is_file()
