"""The report's figures: a labelled image grid (baseline beside run, same prompt and seed, each
image captioned with its scores) and a plot of the win rates with their confidence intervals.

The grid is drawn with PIL (no optional package); the plot needs matplotlib (``align[eval]``).
Both are written next to the report by ``align eval`` (``grid.png``, ``win_rates.png``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from align.eval.stats import Key
from align.extras import require

GRID_FILE = "grid.png"
WIN_RATE_FILE = "win_rates.png"
PAD = 8
FONT_SIZE = 12
LINE = FONT_SIZE + 4
# caption colours: this image scores higher / lower / the same as its pair
WIN, LOSS, TIE = (0, 120, 0), (180, 0, 0), (90, 90, 90)


@dataclass
class GridCell:
    key: Key  # (prompt index, seed)
    set: str  # "run" or "baseline"
    box: tuple[int, int, int, int]  # where the image is drawn: left, top, right, bottom
    caption: list[str]  # one "<reward> <score>" line per reward


def _font(size: int = FONT_SIZE) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # scalable (Pillow >= 10.1 with FreeType)
    except (TypeError, OSError):
        return ImageFont.load_default()


def _fit(draw: ImageDraw.ImageDraw, text: str, width: int, font) -> str:
    """``text`` cut (with an ellipsis) to ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def _grid_keys(keys: set[Key], max_rows: int) -> list[Key]:
    """Up to ``max_rows`` keys, every prompt's first seed before any prompt's second: the grid shows
    as many prompts as it can."""
    rank: dict[int, list[int]] = {}
    for prompt, seed in sorted(keys):
        rank.setdefault(prompt, []).append(seed)
    return sorted(keys, key=lambda k: (rank[k[0]].index(k[1]), k[0]))[:max_rows]


def image_grid(
    score_rows: list[dict],
    rewards: list[str],
    labels: dict[str, str] | None = None,
    max_rows: int = 8,
    cell: int = 192,
) -> tuple[Image.Image, list[GridCell]]:
    """One grid row per (prompt, seed): the prompt above, the baseline image then the run image
    (only the run's when there is no baseline), each captioned with its scores, green where it
    beats its pair and red where it loses. ``score_rows`` are ``align eval``'s per-image rows
    (``scores.csv``); ``labels``: column titles by set. Images are scaled to ``cell`` pixels."""
    by_set: dict[str, dict[Key, dict]] = {}
    for row in score_rows:
        by_set.setdefault(row["set"], {})[(int(row["prompt_index"]), int(row["seed"]))] = row
    sets = [s for s in ("baseline", "run") if s in by_set]
    if "run" not in by_set:
        raise ValueError("no scored run images to show")
    keys = _grid_keys(set.intersection(*(set(by_set[s]) for s in sets)), max_rows)
    labels = labels or {}
    font = _font()
    width = len(sets) * cell + (len(sets) + 1) * PAD
    row_height = 2 * LINE + cell + len(rewards) * LINE + PAD
    grid = Image.new("RGB", (width, PAD + LINE + len(keys) * row_height), "white")
    draw = ImageDraw.Draw(grid)
    for j, name in enumerate(sets):
        title = labels.get(name, name)
        draw.text((PAD + j * (cell + PAD), PAD), _fit(draw, title, cell, font), "black", font)
    cells = []
    for i, key in enumerate(keys):
        top = PAD + LINE + i * row_height
        prompt = by_set["run"][key]["prompt"]
        header = _fit(draw, f"prompt {key[0]}, seed {key[1]}: {prompt}", width - 2 * PAD, font)
        draw.text((PAD, top + LINE // 2), header, "black", font)
        for j, name in enumerate(sets):
            row, left = by_set[name][key], PAD + j * (cell + PAD)
            box = (left, top + 2 * LINE, left + cell, top + 2 * LINE + cell)
            with Image.open(row["path"]) as image:
                image = image.convert("RGB")
            # tiny models render 32 px: enlarge without blurring so what was drawn stays visible
            grow = image.width < cell
            grid.paste(
                image.resize((cell, cell), Image.NEAREST if grow else Image.LANCZOS), box[:2]
            )
            other = by_set[sets[1 - j]][key] if len(sets) == 2 else None
            caption = []
            for k, reward in enumerate(rewards):
                score = float(row[reward])
                colour = "black"
                if other is not None:
                    theirs = float(other[reward])
                    colour = WIN if score > theirs else LOSS if score < theirs else TIE
                caption.append(f"{reward} {score:.4g}")
                draw.text((left, box[3] + k * LINE), caption[-1], colour, font)
            cells.append(GridCell(key, name, box, caption))
    return grid, cells


def win_rate_figure(report: dict):
    """Each reward's win rate against the baseline with its bootstrap interval (a matplotlib
    Figure, no pyplot: ``align eval`` runs headless)."""
    Figure = require("matplotlib.figure", "eval", "the win-rate plot").Figure
    names = [name for name, r in report["rewards"].items() if r.get("win_rate")]
    if not names:
        raise ValueError("no win rates to plot (no baseline)")
    wins = [report["rewards"][name]["win_rate"] for name in names]
    conf = int(round(100 * report.get("confidence", 0.95)))
    pairing = "median image per prompt" if report.get("pairing") == "median" else "prompt and seed"
    fig = Figure(figsize=(7.0, 1.4 + 0.45 * len(names)), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    rows = list(range(len(names)))[::-1]  # the first reward on top, as in the table
    below, above = [w["value"] - w["low"] for w in wins], [w["high"] - w["value"] for w in wins]
    ax.errorbar([w["value"] for w in wins], rows, xerr=[below, above], fmt="o", capsize=4)
    ax.axvline(0.5, color="gray", ls="--", lw=0.8)  # no preference either way
    ax.set_xlim(-0.03, 1.03)  # a win rate of 0 or 1 stays visible
    ax.set_ylim(-0.6, len(names) - 0.4)
    # the numbers in the tick labels: constrained layout makes room for them, never clips them
    labels = [
        f"{name}\n{w['value']:.2f} [{w['low']:.2f}, {w['high']:.2f}]  "
        f"W/T/L {w['wins']}/{w['ties']}/{w['losses']}"
        for name, w in zip(names, wins)
    ]
    ax.set_yticks(rows, labels=labels, fontsize=8)
    ax.set_xlabel(f"win rate of run vs baseline, {conf}% bootstrap CI (paired by {pairing})")
    ax.set_title(f"{Path(report['run']).name} vs {Path(report['baseline']).name}", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    return fig


def write_figures(
    report: dict, score_rows: list[dict], out_dir: str | Path, plot: bool = True
) -> dict[str, Path]:
    """Write ``grid.png`` (when images were scored) and ``win_rates.png`` (when there is a baseline
    and ``plot``) to ``out_dir``; returns what was written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    rewards = list(report["rewards"])
    if score_rows and rewards:
        labels = {"run": f"run: {Path(report['run']).name}"}
        if report.get("baseline"):
            labels["baseline"] = f"baseline: {Path(report['baseline']).name}"
        grid, _ = image_grid(score_rows, rewards, labels)
        grid.save(out / GRID_FILE)
        written["grid"] = out / GRID_FILE
    if plot and report.get("baseline") and rewards:
        win_rate_figure(report).savefig(out / WIN_RATE_FILE)
        written["win_rates"] = out / WIN_RATE_FILE
    return written
