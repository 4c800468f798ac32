"""Prompt sets from txt, jsonl, csv/tsv (PartiPrompts) and parquet (Pick-a-Pic),
and their errors."""

from __future__ import annotations

import json

import pytest

from align.data.prompt_files import PromptSetError, read_prompts


def test_txt_skips_blank_lines(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("a cat\n\n  a dog  \na cat\n")
    assert read_prompts(path) == ["a cat", "a dog", "a cat"]
    assert read_prompts(path, dedupe=True) == ["a cat", "a dog"]
    assert read_prompts(path, limit=1) == ["a cat"]


def test_jsonl_objects_and_strings(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(
        "\n".join(
            [
                json.dumps({"prompt": "one"}),
                json.dumps("two"),
                json.dumps({"caption": "three", "x": 1}),
            ]
        )
    )
    assert read_prompts(path) == ["one", "two", "three"]
    path.write_text(json.dumps({"text": "a", "other": "b"}) + "\n")
    assert read_prompts(path, column="other") == ["b"]


def test_partiprompts_tsv_and_csv(tmp_path):
    tsv = tmp_path / "PartiPrompts.tsv"
    tsv.write_text(
        "Prompt\tCategory\tChallenge\tNote\nbond\tAbstract\tBasic\t\n"
        "A sign that says 'hi, you'\tWriting\tBasic\tquoted, with comma\n"
    )
    assert read_prompts(tsv) == ["bond", "A sign that says 'hi, you'"]
    csv_path = tmp_path / "p.csv"
    csv_path.write_text('id,caption\n1,"a cat, sitting"\n2,a dog\n')
    assert read_prompts(csv_path) == ["a cat, sitting", "a dog"]
    with pytest.raises(PromptSetError, match="no column 'Prompt'.*id, caption"):
        read_prompts(csv_path, column="Prompt")


def test_pickapic_parquet_caption_deduplicated(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "test.parquet"
    table = pa.table(
        {
            "caption": ["b cat", "a dog", "b cat", None, "c fox", "a dog"],
            "jpg_0": [b"\x00"] * 6,
            "label_0": [1.0, 0.0, 0.5, 1.0, 1.0, 0.0],
        }
    )
    pq.write_table(table, path)
    # test_unique style: first occurrences, in order
    assert read_prompts(path) == ["b cat", "a dog", "c fox"]
    assert read_prompts(path, dedupe=False) == ["b cat", "a dog", "b cat", "c fox", "a dog"]


@pytest.mark.parametrize(
    "content,name", [("\n  \n", "empty.txt"), ("", "empty.jsonl"), ("Prompt\n", "e.tsv")]
)
def test_empty_prompt_set_is_an_error(tmp_path, content, name):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(PromptSetError, match="empty"):
        read_prompts(path)


def test_missing_and_unknown_files(tmp_path):
    with pytest.raises(PromptSetError, match="does not exist"):
        read_prompts(tmp_path / "nope.txt")
    (tmp_path / "p.xml").write_text("<a/>")
    with pytest.raises(PromptSetError, match="unknown format"):
        read_prompts(tmp_path / "p.xml")
