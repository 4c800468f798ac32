import open_clip

from align.models.tokenizer import EOT_ID, SOT_ID, build_clip_tokenizer


def test_ids_match_open_clip_bpe_and_sd_layout():
    tok = build_clip_tokenizer()
    text = "A photo of an astronaut riding a horse on Mars, 4k!"
    ours = tok(text, padding="max_length", max_length=77, truncation=True).input_ids
    ref = open_clip.tokenize([text])[0].tolist()
    n = ref.index(EOT_ID) + 1
    assert ours[:n] == ref[:n]
    assert ours[0] == SOT_ID and len(ours) == 77
    assert set(ours[n:]) == {EOT_ID}  # SD1.5 pads with <|endoftext|>
    # a well-known SD id sequence: "a photo of an astronaut riding a horse"
    assert tok("a photo of an astronaut riding a horse").input_ids == [
        49406,
        320,
        1125,
        539,
        550,
        18376,
        6765,
        320,
        4558,
        49407,
    ]


def test_sdxl_second_tokenizer_pads_with_bang():
    tok = build_clip_tokenizer(pad_token="!")
    ids = tok("hi", padding="max_length", max_length=6).input_ids
    assert ids == [SOT_ID, 1883, EOT_ID, 0, 0, 0]


def test_truncates_to_77():
    tok = build_clip_tokenizer()
    ids = tok("word " * 200, padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ids) == 77 and ids[-1] == EOT_ID
