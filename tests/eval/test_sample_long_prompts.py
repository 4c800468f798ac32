"""`align sample` on long prompts: the segment encoder sees text past token 77, CLIP's 77-token cut
does not; a LongAlign SFT export (LoRA + prompt_encoder.json + align_export.json) samples with
nothing else given."""

import json

import numpy as np
import torch
from PIL import Image

from align.cli import main
from align.modules import SFTModule

# well over 77 tokens
HEAD = " ".join(["a red circle in the top left corner of a plain white canvas."] * 8)
PROMPTS = [
    HEAD + " a blue square sits in the bottom right.",
    HEAD + " a green triangle sits in the bottom right.",
]


def render(tmp_path, name, *flags, checkpoint="tiny"):
    prompt_file = tmp_path / "long.txt"
    prompt_file.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / name
    assert (
        main(
            [
                "sample",
                "--checkpoint",
                checkpoint,
                "--prompt-file",
                str(prompt_file),
                "--out",
                str(out),
                "--steps",
                "2",
                "--device",
                "cpu",
                "--no-progress",
                *flags,
            ]
        )
        == 0
    )
    return out, [np.asarray(Image.open(out / f"{i:05d}_0.png"), dtype=np.float32) for i in range(2)]


def test_segment_encoder_sees_text_past_token_77_and_clip_does_not(tmp_path):
    _, clip_images = render(tmp_path, "clip")
    _, segment_images = render(tmp_path, "segment", "--encoder", "segment")
    assert np.array_equal(clip_images[0], clip_images[1])  # the prompts differ only after token 77
    assert not np.array_equal(segment_images[0], segment_images[1])


def test_lora_sft_export_samples_with_its_own_encoder(tmp_path):
    module = SFTModule(model="tiny", prompt_encoder="segment", lora_rank=4)
    with torch.no_grad():
        for name, p in module.unet.named_parameters():
            if "lora_B" in name:
                p.normal_()
    export = module.export(tmp_path / "export")
    assert json.loads((export / "align_export.json").read_text())["base_model"] == "tiny"
    out, images = render(tmp_path, "sft", checkpoint=str(export))
    meta = json.loads((out / "meta.json").read_text())
    assert meta["encoder"] == str(export) and meta["lora_base"] == "tiny"
    # segment encoding, from the export's prompt_encoder.json
    assert not np.array_equal(images[0], images[1])
    _, base_images = render(tmp_path, "base", "--encoder", "segment")
    assert not np.array_equal(images[0], base_images[0])  # the LoRA was applied
