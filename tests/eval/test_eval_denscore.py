"""`align eval --rewards denscore` reports Denscore-O (original), Denscore
(text-relevant) and S_w, per image."""

import json

from align.cli import main
from align.rewards.denscore import write_tiny_denscore

PROMPTS = [
    "A red circle in the top left. A blue square in the bottom right. The background is white.",
    "Two green triangles. One is above the other. Both have sharp edges.",
]


def test_denscore_reports_original_and_decomposed_columns(tmp_path):
    denscore = write_tiny_denscore(tmp_path / "denscore")
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("\n".join(PROMPTS) + "\n")
    for name in ("run", "base"):
        assert (
            main(
                [
                    "sample",
                    "--checkpoint",
                    "tiny",
                    "--prompts",
                    str(prompt_file),
                    "--out",
                    str(tmp_path / name),
                    "--steps",
                    "2",
                    "--device",
                    "cpu",
                    "--no-progress",
                ]
                + (["--guidance-scale", "3"] if name == "base" else [])
            )
            == 0
        )
    assert (
        main(
            [
                "eval",
                "--images",
                str(tmp_path / "run"),
                "--baseline",
                str(tmp_path / "base"),
                "--rewards",
                "denscore",
                "--reward-source",
                f"denscore={denscore}",
                "--out",
                str(tmp_path / "report"),
                "--device",
                "cpu",
                "--bootstrap",
                "50",
            ]
        )
        == 0
    )
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    columns = report["rewards"]
    assert {"denscore-o", "denscore", "denscore-w"} <= set(columns)
    for column in ("denscore-o", "denscore", "denscore-w"):
        assert "win_rate" in columns[column] and columns[column]["win_rate"]["n"] == 2
    o, relevant, weighted = (
        columns[c]["run"]["value"] for c in ("denscore-o", "denscore", "denscore-w")
    )
    # S_w = relevant + w * irrelevant and original = relevant + irrelevant, with w = 0.3 in between
    assert min(o, relevant) - 1e-6 <= weighted <= max(o, relevant) + 1e-6
