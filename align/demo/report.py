"""The demo's report: a markdown summary, judge score vs training step per method,
and a grid of samples."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from align.extras import require

PLOTS = "the demo report's judge curves"


def mean_spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value)."""
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def expectation(method: str) -> str:
    """What a method must do to the judge score: "down" for the flipped controls and a misspecified
    reward (``grpo-redness``), "control" for truncation (it cannot see facts past token 77) and for
    random labels (what training on the images does whatever the labels), "up" for everything
    else."""
    if method.endswith(("-flipped", "-redness")):
        return "down"
    return "control" if method.endswith(("-truncate", "-shuffled")) else "up"


# the control each method is also compared with when it ran: segment encoding vs truncation; DPO,
# KTO and their flipped controls vs the same method on random labels (what training on the same
# images does whatever the labels)
RIVALS = {
    "sft-segment": "sft-truncate",
    "dpo": "dpo-shuffled",
    "dpo-flipped": "dpo-shuffled",
    "kto": "kto-shuffled",
    "kto-flipped": "kto-shuffled",
}


def judging_error(runs: list[dict], reference) -> float | None:
    """Standard error of a mean change that comes from the finite set of held-out captions judged.

    ``reference``: the base's per-caption scores, or the runs of the method compared with. The
    change per caption (averaged over training seeds and sampling seeds) is treated as a sample of
    captions: sd / sqrt(#captions). The spread over training seeds misses this part, because every
    training seed is judged on the same captions and seeds and so shares their luck. None when
    per-caption scores are missing.
    """

    def per_caption(x):
        if isinstance(x, list) and x and isinstance(x[0], dict):
            if any("caption_scores" not in r for r in x):
                return None
            return np.mean([r["caption_scores"] for r in x], axis=0)
        return None if x is None else np.asarray(x, dtype=np.float64)

    a, b = per_caption(runs), per_caption(reference)
    if a is None or b is None or len(a) < 2 or len(a) != len(b):
        return None
    diff = a - b
    return float(diff.std(ddof=1) / np.sqrt(len(diff)))


def _shown(gap: float, sd: float, se: float | None) -> str:
    """Whether a change (``gap``, signed so that positive is the expected direction) is beyond 2 sd
    over training seeds and, when known, beyond 2 judging standard errors."""
    if gap <= 2 * sd:
        return "NOT shown at this scale"
    if se is not None and gap <= 2 * se:
        return "NOT shown: beyond 2 sd over seeds, within 2 judging SE"
    return "yes"


def verdict(
    method: str, runs: list[dict], baseline: float, results: dict, caption_baseline=None
) -> str:
    m, sd = mean_spread([r["final"] for r in runs])
    want = expectation(method)
    se = judging_error(runs, caption_baseline)
    direction = "raises" if m > baseline else "lowers" if m < baseline else "leaves"
    head = f"{direction} the score by {abs(m - baseline):.4f} (2 sd = {2 * sd:.4f}"
    head += ")" if se is None else f", 2 judging SE = {2 * se:.4f})"
    if len(runs) < 2:
        return f"{head}; no verdict with one training seed"
    if want == "control":
        return f"{head}; control (no expectation)"
    gain = (m - baseline) if want == "up" else (baseline - m)
    out = f"{head}; expected {want}: {_shown(gain, sd, se)}"
    rival = RIVALS.get(method)
    if rival in results:
        mr, sdr = mean_spread([r["final"] for r in results[rival]])
        gap = (m - mr) if want == "up" else (mr - m)
        word = "beats" if want == "up" else "falls below"
        out += (
            f"; {word} {rival} ({mr:.4f}) by {abs(m - mr):.4f}: "
            f"{_shown(gap, max(sd, sdr), judging_error(runs, results[rival]))}"
        )
    marked = [r["monitor"]["hacking_step"] for r in runs if r.get("monitor")]
    if marked:
        out += f"; the reward-hacking monitor marked steps {marked} (one per seed; None: never)"
    return out


def plot_curves(results: dict, baselines: dict, path: Path) -> None:
    require("matplotlib", "demo", PLOTS).use("Agg")
    plt = require("matplotlib.pyplot", "demo", PLOTS)

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for method, runs in results.items():
        steps = [s for s, _ in runs[0]["curve"]]
        vals = np.array([[v for _, v in r["curve"]] for r in runs if len(r["curve"]) == len(steps)])
        style = "--" if "flipped" in method else "-." if "shuffled" in method else "-"
        (line,) = ax.plot(steps, vals.mean(0), marker="o", label=method, linestyle=style)
        ax.fill_between(steps, vals.min(0), vals.max(0), color=line.get_color(), alpha=0.15)
    for value in sorted(set(baselines.values())):
        ax.axhline(value, color="grey", lw=0.8, linestyle=":")
    ax.set_xlabel("training step")
    ax.set_ylabel("judge score (fraction of facts satisfied)")
    ax.set_title(
        "held-out captions; mean over training seeds, band = min..max; dotted: base", fontsize=9
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def sample_grid(
    samples: dict, captions: list[str], per_caption: int, path: Path, rows: int = 8, scale: int = 3
) -> None:
    """Rows: the first ``rows`` held-out captions (first sampling seed); columns: models."""
    names = list(samples)
    cell = 32 * scale
    pad, header = 4, 14
    size = (len(names) * (cell + pad) + pad, header + rows * (cell + pad) + pad)
    grid = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for j, name in enumerate(names):
        x = pad + j * (cell + pad)
        draw.text((x, 1), name[:16], fill=(0, 0, 0))
        for i in range(min(rows, len(captions))):
            tile = Image.fromarray(samples[name][i * per_caption])
            grid.paste(tile.resize((cell, cell), Image.NEAREST), (x, header + i * (cell + pad)))
    grid.save(path)
    (path.with_suffix(".txt")).write_text(
        "\n".join(f"row {i}: {c}" for i, c in enumerate(captions[:rows])) + "\n"
    )


def write_report(
    out: Path, summary: dict, samples: dict, captions: list[str], per_caption: int
) -> Path:
    results, baselines, cfg = summary["results"], summary["baselines"], summary["config"]
    plot_curves(results, summary["curve_baselines"], out / "judge_curves.png")
    sample_grid(samples, captions, per_caption, out / "samples.png")
    flow = cfg["base"]["family"] != "sd15"
    sampler = "flow Euler" if flow else "DDIM"
    lines = [
        "# align demo: the shapes world" + (", a flow-matching (SD3-shaped) base" if flow else ""),
        "",
        f"Command: `{summary['command']}`  ",
        f"torch threads: {summary['torch_threads']}; total time "
        f"{summary['timings_s']['total']:.0f}s",
        "",
        "Judge score = fraction of a caption's facts (colour and shape of each object at its "
        f"position) that the image satisfies, on {len(captions)} held-out captions "
        f"({cfg['eval_set']} set) x {per_caption} fixed sampling seeds ({sampler} "
        f"{cfg['sample_steps']} steps, CFG {cfg['guidance']}). Spread = standard deviation over "
        f"{cfg['seeds']} training seeds (the base is one fixed model). The curves "
        "(`judge_curves.png`) are judged on the first "
        f"{min(cfg['curve_seeds'] or per_caption, per_caption)} of those sampling seeds at "
        "every step, the table on all of them.",
        "",
        "## Results",
        "",
        "| model | evaluated on | judge score (mean ± sd over seeds) | base on the same | change "
        "vs base (judging SE) | per seed |",
        "|---|---|---|---|---|---|",
        f"| base | short captions | {summary['base_score']:.4f} | — | — | — |",
    ]
    verdicts = []
    for method, runs in results.items():
        finals = [r["final"] for r in runs]
        m, sd = mean_spread(finals)
        b, caption_baseline = baselines[method], summary["caption_baselines"][method]
        se = judging_error(runs, caption_baseline)
        verdicts.append(f"- {method}: {verdict(method, runs, b, results, caption_baseline)}")
        lines.append(
            f"| {method} | {summary['eval_sets'][method]} | {m:.4f} ± {sd:.4f} | {b:.4f} | "
            f"{m - b:+.4f}{'' if se is None else f' ({se:.4f})'} | "
            f"{', '.join(f'{v:.4f}' for v in finals)} |"
        )
    lines += [
        "",
        "Verdicts (a method 'raises' the score when mean - base > 2 sd over training seeds; a "
        "flipped control 'lowers' it when base - mean > 2 sd; segment encoding 'beats' "
        "truncation, and DPO, KTO or a flipped control differs from the same method on random "
        "labels, when the difference of means > 2 sd, the larger of the two. Each must also "
        "exceed 2 judging SE: the standard error of the change over the held-out captions "
        "(per-caption changes averaged over training and sampling seeds, sd / sqrt(#captions)), "
        "which the spread over training seeds misses because every seed is judged on the same "
        "captions and sampling seeds):",
        "",
        *verdicts,
    ]
    p = summary["preferences"]
    pairs = "pairs, each caption's best and worst image" if p.get("best_worst") else "pairs"
    lines += [
        "",
        "## Data",
        "",
        f"Preference data: the base sampled {p['images']} images for {p['captions']} training "
        f"captions (disjoint from the held-out ones), mean judge score {p['mean_score']:.4f}; "
        f"{p['pairs']} {pairs} ({p['decisive_pairs']} decisive, {p['ties']} ties, dropped by the "
        f"DPO data module as in the official code); {p['desirable']} of {p['images']} images "
        "desirable (every fact satisfied).",
        "",
    ]
    if summary["preference_model"] is not None:
        lines += [
            "Tiny CLIP preference model (rft-clip's reward): held-out pairwise accuracy "
            f"{summary['preference_model']:.3f} on judge-labelled rendered pairs.",
            "",
        ]
    lines += [
        "## Runs",
        "",
        "Each method is one config of `configs/demo/` run by `align fit` "
        "(training seed 0 shown; the others differ in the seed flags only):",
        "",
        "```",
        *summary["commands"].values(),
        "```",
        "",
        "## Settings",
        "",
        "```",
        *(f"{k}: {v}" for k, v in cfg.items()),
        "```",
        "",
        "## Timings (seconds)",
        "",
        *(f"- {k}: {v:.0f}" for k, v in summary["timings_s"].items()),
        "",
        "![judge curves](judge_curves.png)",
        "",
        "![samples](samples.png)",
        "",
        "Sample grid: rows are the first held-out captions (`samples.txt`), columns the models "
        "(training seed 0, first sampling seed); the sft-* columns show the held-out long "
        "captions instead (`long_eval_captions` in demo.json).",
        "",
    ]
    path = out / "README.md"
    path.write_text("\n".join(lines) + "\n")
    return path
