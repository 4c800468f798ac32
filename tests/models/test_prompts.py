import torch

from align.models import load_components
from align.models.prompts import CLIPPromptEncoder, SDXLPromptEncoder, build_prompt_encoder


@torch.no_grad()
def test_sd15_uses_last_hidden_state_of_77_tokens():
    c = load_components("tiny")
    enc = build_prompt_encoder(c)
    assert isinstance(enc, CLIPPromptEncoder)
    out = enc(["a red circle", ""])
    ids = c.tokenizers[0](
        ["a red circle", ""], padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    assert torch.allclose(out.embeds, c.text_encoders[0](ids).last_hidden_state)
    assert out.pooled is None and out.embeds.shape == (2, 77, 32)


@torch.no_grad()
def test_sdxl_concatenates_penultimate_states_and_pools_from_encoder_two():
    c = load_components("tiny-xl")
    enc = build_prompt_encoder(c)
    assert isinstance(enc, SDXLPromptEncoder)
    out = enc(["a blue square"])
    hs = []
    for tok, te in zip(c.tokenizers, c.text_encoders):
        ids = tok(
            ["a blue square"], padding="max_length", max_length=77, return_tensors="pt"
        ).input_ids
        res = te(ids, output_hidden_states=True)
        hs.append(res.hidden_states[-2])
    assert torch.allclose(out.embeds, torch.cat(hs, -1))
    assert torch.allclose(out.pooled, res.text_embeds)
    assert out.repeat(2).embeds.shape[0] == 2 and out.repeat(2).pooled.shape[0] == 2
