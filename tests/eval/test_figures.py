"""The report's figures on fabricated scores (no models): a run without a baseline gets a one-column
grid and no win-rate plot; captions are coloured by which image of a pair scores higher."""

from __future__ import annotations

from PIL import Image

from align.eval.figures import GRID_FILE, LOSS, PAD, TIE, WIN, image_grid, write_figures


def fabricated_rows(tmp_path, sets=("run", "baseline"), prompts=3, seeds=(0, 1)):
    rows = []
    for s, name in enumerate(sets):
        for p in range(prompts):
            for seed in seeds:
                path = tmp_path / f"{name}-{p}-{seed}.png"
                Image.new("RGB", (32, 32), (40 * p, 100 * seed, 120 * s)).save(path)
                score = {"run": 1.0, "baseline": 0.5}[name] if p else 0.7  # prompt 0: a tie
                rows.append(
                    {
                        "set": name,
                        "prompt_index": p,
                        "seed": seed,
                        "prompt": f"prompt {p}",
                        "path": str(path),
                        "hps": score,
                    }  # fmt: skip
                )
    return rows


def test_run_without_baseline(tmp_path):
    rows = fabricated_rows(tmp_path, sets=("run",))
    report = {"run": str(tmp_path / "run"), "baseline": None, "rewards": {"hps": {}}}
    written = write_figures(report, rows, tmp_path / "out")
    assert list(written) == ["grid"] and written["grid"] == tmp_path / "out" / GRID_FILE
    with Image.open(written["grid"]) as grid:
        assert grid.width == 192 + 2 * PAD
    _, cells = image_grid(rows, ["hps"], max_rows=4)
    # every prompt's first seed before any second seed, at most max_rows
    assert [c.key for c in cells] == [(0, 0), (1, 0), (2, 0), (0, 1)]
    assert {c.set for c in cells} == {"run"}


def test_caption_colours_say_which_image_won(tmp_path):
    rows = fabricated_rows(tmp_path)
    grid, cells = image_grid(rows, ["hps"], max_rows=6, cell=64)

    def caption_colours(cell):
        left, _, right, bottom = cell.box
        band = grid.crop((left, bottom, right, bottom + 16)).getcolors(64 * 16)
        return {colour for _, colour in band} - {(255, 255, 255)}

    by = {(c.set, c.key): c for c in cells}
    assert WIN in caption_colours(by[("run", (1, 0))])
    assert LOSS in caption_colours(by[("baseline", (1, 0))])
    assert TIE in caption_colours(by[("run", (0, 0))])
