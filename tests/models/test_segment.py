"""Segment-level (LongAlign) text encoding against a direct computation with the same tiny CLIP."""

from __future__ import annotations

import pytest
import torch

from align.models import load_components
from align.models.prompts import CLIPPromptEncoder, build_prompt_encoder
from align.models.segment import SegmentTextEncoder
from align.models.splitters import PackedSplitter, official_split, split_sentences
from align.models.t5_adapter import T5Branch, TextAdapter, build_t5_branch, write_tiny_t5
from align.models.tokenizer import EOT_ID, SOT_ID

THREE = "A red cat sits on the mat. The dog runs in the park? Green trees stand tall"


@pytest.fixture(scope="module")
def clip():
    components = load_components("tiny")
    return components, components.tokenizers[0], components.text_encoders[0]


@pytest.fixture(scope="module")
def encoder(clip):
    _, tokenizer, text_encoder = clip
    return SegmentTextEncoder(tokenizer, text_encoder)


@pytest.fixture(scope="module")
def tiny_t5_dir(tmp_path_factory):
    return write_tiny_t5(tmp_path_factory.mktemp("tiny-t5"))


@torch.no_grad()
def direct(tokenizer, text_encoder, segment: str):
    """One segment on its own, SD-style (padded to 77): (ids, n_real, hidden (77, D))."""
    tokens = tokenizer(
        [segment], padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    )
    return (
        tokens.input_ids[0],
        int(tokens.attention_mask.sum()),
        text_encoder(tokens.input_ids)[0][0],
    )


def direct_rows(tokenizer, text_encoder, segments, max_rows=240):
    """The expected conditioning, one CLIP call per segment: kept rows, then <pad*>."""
    kept = []
    for segment in segments:
        ids, n, hidden = direct(tokenizer, text_encoder, segment)
        assert ids[0] == SOT_ID and ids[n - 1] == EOT_ID and (ids[n:] == EOT_ID).all()
        kept.append(hidden[: n - 1])
    rows = torch.cat(kept)[:max_rows]
    pad = direct(tokenizer, text_encoder, "")[2][17:77].mean(dim=0)
    return torch.cat([rows, pad.expand(max_rows - rows.shape[0], -1)]), rows.shape[0], pad


def test_three_sentences_match_direct_computation(clip, encoder):
    _, tokenizer, text_encoder = clip
    segments = encoder.segments(THREE)
    assert segments == [
        "A red cat sits on the mat.",
        " The dog runs in the park.",
        " Green trees stand tall.",
    ]
    out = encoder([THREE]).embeds
    assert out.shape == (1, 240, 32) and out.dtype == torch.float32
    expected, n_rows, pad = direct_rows(tokenizer, text_encoder, segments)
    # a red cat sits on the mat . = 8 tokens; the dog runs in the park . = 7;
    # green trees stand tall . = 5
    assert n_rows == (1 + 8) + (1 + 7) + (1 + 5)
    torch.testing.assert_close(out[0], expected, rtol=0, atol=1e-5)
    # exactly these rows: each segment's <sot> row sits at offsets 0, 9, 17
    # (every <sot> encodes the same)
    sot_row = direct(tokenizer, text_encoder, "")[2][0]
    for start in (0, 9, 17):
        torch.testing.assert_close(out[0, start], sot_row, rtol=0, atol=1e-5)
    assert not torch.allclose(out[0, 8], sot_row) and not torch.allclose(out[0, 16], sot_row)
    # no <eot> row survives: the <eot> encoding of the first segment appears nowhere
    _, n, hidden = direct(tokenizer, text_encoder, segments[0])
    assert not any(torch.allclose(row, hidden[n - 1], atol=1e-5) for row in out[0, :n_rows])
    # <pad*> = mean of rows 17..76 of the empty prompt's encoding, everywhere after the kept rows
    torch.testing.assert_close(encoder.pad_row(), pad, rtol=0, atol=1e-6)
    assert torch.allclose(out[0, n_rows:], pad.expand(240 - n_rows, -1), atol=1e-6)
    assert out.requires_grad is False  # CLIP is frozen


def test_truncation_at_max_rows(clip, encoder):
    _, tokenizer, text_encoder = clip
    short = SegmentTextEncoder(tokenizer, text_encoder, max_rows=12)([THREE]).embeds
    assert short.shape == (1, 12, 32)
    torch.testing.assert_close(short[0], encoder([THREE]).embeds[0, :12], rtol=0, atol=1e-5)
    many = " ".join(f"Object number {i} is a small red cube on a table." for i in range(30))
    segments = encoder.segments(many)
    expected, n_rows, _ = direct_rows(tokenizer, text_encoder, segments)
    assert n_rows == 240
    torch.testing.assert_close(encoder([many]).embeds[0], expected, rtol=0, atol=1e-5)


def test_text_beyond_77_tokens_changes_segment_conditioning_only(clip, encoder):
    _, tokenizer, text_encoder = clip
    prefix = " ".join(f"Detail {i} shows a wooden chair beside a lamp." for i in range(10))
    assert len(tokenizer(prefix).input_ids) > 77
    a, b = prefix + " A purple elephant dances.", prefix + " A green giraffe sleeps."
    plain = CLIPPromptEncoder(tokenizer, text_encoder)
    with torch.no_grad():
        assert torch.equal(plain([a]).embeds, plain([b]).embeds)
    sa, sb = encoder([a, b]).embeds
    assert not torch.allclose(sa, sb)
    n_prefix = sum(direct(tokenizer, text_encoder, s)[1] - 1 for s in encoder.segments(prefix))
    # only the tail differs
    torch.testing.assert_close(sa[:n_prefix], sb[:n_prefix], rtol=0, atol=1e-5)


def test_empty_caption_is_sot_row_then_pad(clip, encoder):
    _, tokenizer, text_encoder = clip
    assert encoder.segments("") == [""]
    out = encoder([""]).embeds[0]
    _, n, hidden = direct(tokenizer, text_encoder, "")
    assert n == 2  # <sot> <eot>
    torch.testing.assert_close(out[0], hidden[0], rtol=0, atol=1e-5)
    assert torch.allclose(out[1:], encoder.pad_row().expand(239, -1), atol=1e-6)
    uncond = encoder.uncond(3)
    assert uncond.embeds.shape == (3, 240, 32) and uncond.pooled is None
    assert torch.equal(uncond.embeds, out.expand(3, -1, -1))


@pytest.mark.parametrize(
    "caption",
    [
        "a cat on a mat under the warm sun",  # no sentence punctuation
        "Ein Café in Köln. 東京の夜景が美しい! Ünïcödé snow ☃ and naïve façade.",  # non-ASCII
    ],
)
def test_edge_captions_match_direct(clip, encoder, caption):
    _, tokenizer, text_encoder = clip
    segments = encoder.segments(caption)
    expected, n_rows, _ = direct_rows(tokenizer, text_encoder, segments)
    out = encoder([caption]).embeds[0]
    assert n_rows > 3 and torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def test_sentence_longer_than_77_tokens_is_truncated_per_segment(clip, encoder):
    _, tokenizer, text_encoder = clip
    long_sentence = " ".join(["bright"] * 100)
    caption = f"{long_sentence}. A small dog"
    assert len(tokenizer(long_sentence).input_ids) > 77
    segments = encoder.segments(caption)
    assert len(segments) == 2
    expected, n_rows, _ = direct_rows(tokenizer, text_encoder, segments)
    # <sot> + 75 tokens of the truncated segment, then "<sot> a small dog ."
    assert n_rows == 76 + (1 + 4)
    torch.testing.assert_close(encoder([caption]).embeds[0], expected, rtol=0, atol=1e-5)


def test_5000_token_caption_truncated_and_batched(clip, encoder):
    _, tokenizer, text_encoder = clip
    # 4 tokens a sentence + '.' = 5000+ tokens
    huge = " ".join(f"Tile {i} is blue." for i in range(1250))
    assert len(tokenizer(huge, verbose=False).input_ids) > 5000
    encoder.pad_row()
    calls = []
    hook = text_encoder.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    try:
        out = encoder([huge, THREE, ""]).embeds
    finally:
        hook.remove()
    assert out.shape == (3, 240, 32)
    assert len(calls) == 1  # every segment of every caption in one CLIP forward
    assert calls[0] < len(encoder.segments(huge))  # segments past row 240 are never encoded
    expected, n_rows, _ = direct_rows(tokenizer, text_encoder, encoder.segments(huge)[:60])
    assert n_rows == 240
    torch.testing.assert_close(out[0], expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(out[1], encoder([THREE]).embeds[0], rtol=0, atol=1e-5)


def test_official_splitter_reproduces_the_official_regex():
    # r'"!|\.|\?|;"' splits on '.', '?', and on '!' / ';' only next to a double quote; appends '.'
    assert official_split('A cat. A dog! Hi; "yes!" 3.5 m? ok;" end') == [
        "A cat.",
        ' A dog! Hi; "yes!" 3.',
        "5 m.",
        " ok.",
        " end.",
    ]
    assert official_split("") == [""] and official_split(".") == ["."]
    assert official_split("no punctuation") == ["no punctuation."]


def test_packed_splitter_decimals_abbreviations_and_packing(clip):
    _, tokenizer, text_encoder = clip
    text = (
        "The U.S. flag costs $3.50, e.g. a cheap one. Mr. Smith waves! Dr. J. Doe is 2.5 m tall? "
        "Yes.\nA new line without a dot"
    )
    assert split_sentences(text) == [
        "The U.S. flag costs $3.50, e.g. a cheap one.",
        "Mr. Smith waves!",
        "Dr. J. Doe is 2.5 m tall?",
        "Yes.",
        "A new line without a dot",
    ]
    packed = PackedSplitter(tokenizer)
    assert packed(text) == [" ".join(split_sentences(text))]  # short sentences share one segment
    long_text = (
        " ".join(f"Item {i} is a tiny green pebble resting on sand." for i in range(40))
        + " "
        + " ".join(["sparkling"] * 120)
    )
    segments = packed(long_text)
    counts = [len(ids) for ids in tokenizer(segments, add_special_tokens=False).input_ids]
    assert (
        len(segments) > 3
        and max(counts) <= 75
        and sum(counts)
        == len(
            # nothing lost, nothing cut
            tokenizer(long_text, add_special_tokens=False, verbose=False).input_ids
        )
    )
    assert " ".join(segments).split() == long_text.split()
    enc = SegmentTextEncoder(tokenizer, text_encoder, splitter="packed")
    assert enc.segments(text) == packed(text) and enc.segments("") == [""]
    assert enc([long_text, ""]).embeds.shape == (2, 240, 32)


def test_callable_splitter_and_build_prompt_encoder(clip):
    components, tokenizer, text_encoder = clip
    enc = build_prompt_encoder(
        components, kind="segment", max_rows=64, splitter=lambda c: c.split(",")
    )
    assert isinstance(enc, SegmentTextEncoder)
    assert enc.segments("a cat, a dog") == ["a cat", " a dog"]
    expected, _, _ = direct_rows(tokenizer, text_encoder, ["a cat", " a dog"], max_rows=64)
    torch.testing.assert_close(enc(["a cat, a dog"]).embeds[0], expected, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="unknown splitter"):
        SegmentTextEncoder(tokenizer, text_encoder, splitter="nope")


def test_t5_branch_shape_and_only_adapter_trains(clip, tiny_t5_dir):
    _, tokenizer, text_encoder = clip
    t5 = build_t5_branch(tiny_t5_dir, hidden_dim=24, out_dim=32)
    assert isinstance(t5, T5Branch) and t5.max_length == 240
    enc = SegmentTextEncoder(tokenizer, text_encoder, t5=t5).train()
    assert not t5.encoder.training and not text_encoder.training  # frozen parts stay in eval
    captions = [THREE, ""]
    out = enc(captions).embeds
    assert out.shape == (2, 480, 32) and enc.num_rows == 480
    trainable = {n for n, p in enc.named_parameters() if p.requires_grad}
    assert trainable and trainable == {f"t5.adapter.{n}" for n, _ in t5.adapter.named_parameters()}
    out.square().mean().backward()
    assert all(p.grad is not None for p in t5.adapter.parameters())
    assert all(
        p.grad is None for p in list(text_encoder.parameters()) + list(t5.encoder.parameters())
    )
    enc.eval()  # adapter dropout off: compare with the direct computation
    with torch.no_grad():
        out = enc(captions).embeds
        clip_only = SegmentTextEncoder(tokenizer, text_encoder)(captions).embeds
        ids = t5.tokenizer(
            captions, max_length=240, padding="max_length", truncation=True, return_tensors="pt"
        ).input_ids
        assert ids.shape == (2, 240) and (ids[1, 1:] == t5.tokenizer.pad_token_id).all()
        direct_t5 = t5.adapter(t5.encoder(input_ids=ids)[0])  # official: no attention mask
    torch.testing.assert_close(out[:, :240], clip_only, rtol=0, atol=1e-6)
    torch.testing.assert_close(out[:, 240:], direct_t5, rtol=0, atol=1e-5)


def test_t5_source_string_adapter_roundtrip_and_paper_dims(clip, tiny_t5_dir, tmp_path):
    _, tokenizer, text_encoder = clip
    enc = SegmentTextEncoder(tokenizer, text_encoder, t5=str(tiny_t5_dir), max_rows=16)
    assert enc(["a cat."]).embeds.shape == (1, 16 + 240, 32)
    enc.t5.adapter.save_pretrained(tmp_path / "adapter")
    again = build_t5_branch(tiny_t5_dir, adapter=tmp_path / "adapter")
    for (name, a), (_, b) in zip(
        enc.t5.adapter.state_dict().items(), again.adapter.state_dict().items()
    ):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="out_dim"):
        SegmentTextEncoder(tokenizer, text_encoder, t5=build_t5_branch(tiny_t5_dir, out_dim=48))
    assert build_t5_branch(None) is None
    paper = TextAdapter()  # LaVi-Bridge / LongAlign: 1024 -> 896 -> 768, pre-LayerNorms, GEGLU x4
    shapes = {n: tuple(p.shape) for n, p in paper.named_parameters()}
    assert shapes["norm1.weight"] == (1024,) and shapes["norm2.weight"] == (896,)
    assert shapes["ff1.net.0.proj.weight"] == (2 * 4096, 1024) and shapes["ff1.net.2.weight"] == (
        896,
        4096,
    )
    assert shapes["ff2.net.0.proj.weight"] == (2 * 3584, 896) and shapes["ff2.net.2.weight"] == (
        768,
        3584,
    )
    assert paper(torch.randn(1, 3, 1024)).shape == (1, 3, 768)


def test_a_lavi_bridge_adapter_checkpoint_loads_as_the_t5_adapter(clip, tiny_t5_dir, tmp_path):
    """LaVi-Bridge publishes t5_unet/adapter as a diffusers ModelMixin save with pickled weights
    (config.json + diffusion_pytorch_model.bin); `t5.adapter: <that folder>` starts from it."""
    t5 = build_t5_branch(tiny_t5_dir)
    with torch.no_grad():
        for p in t5.adapter.parameters():
            p.add_(torch.randn_like(p))
    t5.adapter.save_pretrained(tmp_path / "t5_unet/adapter", safe_serialization=False)
    assert (tmp_path / "t5_unet/adapter/diffusion_pytorch_model.bin").is_file()
    loaded = build_t5_branch(tiny_t5_dir, adapter=tmp_path / "t5_unet/adapter")
    for (name, a), (_, b) in zip(
        t5.adapter.state_dict().items(), loaded.adapter.state_dict().items()
    ):
        assert torch.equal(a, b), name
