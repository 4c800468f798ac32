"""The whole demo: world -> base -> judge-made data -> every method's ``align fit`` x seeds ->
report.

The world's part is built here: the base model, on-policy preference shards judged by the exact
judge, long-caption shards, the tiny CLIP's initial weights, the training captions and the held-out
judge set (``<artifacts>/judge.json``: the ``eval_set`` of this demo). Every training run is then
exactly what a user runs: ``align fit --config configs/demo/<method>.yaml`` (the same modules, data
modules and callbacks), with ``ALIGN_DEMO=<artifacts>`` and per-run flags (seed, control data,
quick sizes).
Runs are independent once the world exists, so ``workers`` processes (one torch thread each: the
tiny model runs best single-threaded) run them side by side. Each run's ``ShapesJudge`` callback
writes its held-out judge score to ``<artifacts>/runs/<method>/seed<k>/judge.json``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch

from align.demo import world
from align.demo.base import BaseConfig, build_base, log, prompt_encoder
from align.demo.evaluate import caption_means, evaluate, first_seeds_score, make_pipeline, sample
from align.demo.judge import parse_caption
from align.demo.prefs import (
    build_records,
    pair_samples,
    single_samples,
    summary,
    write_pairs,
    write_singles,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "demo"
NEGATED_JUDGE = "align.demo.soft_judge:shapes-judge-exact:-1"  # the flipped online runs' reward
# method -> (config, flags that make it a control). Flipped: the same run on reversed labels (GRPO:
# the negated reward); shuffled: on random labels (what training on these images does whatever
# the preference)
METHODS = {
    "dpo": ("dpo.yaml", []),
    "dpo-flipped": ("dpo.yaml", ["--data.init_args.train_shards", "{art}/prefs/pairs-flipped"]),
    "dpo-shuffled": ("dpo.yaml", ["--data.init_args.train_shards", "{art}/prefs/pairs-shuffled"]),
    "kto": ("kto.yaml", []),
    "kto-flipped": ("kto.yaml", ["--data.init_args.shards", "{art}/prefs/singles-flipped"]),
    "kto-shuffled": ("kto.yaml", ["--data.init_args.shards", "{art}/prefs/singles-shuffled"]),
    "sft-segment": ("sft.yaml", []),
    "sft-truncate": ("sft.yaml", ["--model.init_args.prompt_encoder", "clip"]),
    "rft-judge": ("rft_judge.yaml", []),
    "rft-clip": ("rft_clip.yaml", []),
    "grpo": ("grpo.yaml", []),
    "grpo-flipped": ("grpo.yaml", ["--model.init_args.reward.init_args.rewards", NEGATED_JUDGE]),
    "grpo-redness": ("grpo_redness.yaml", []),  # a misspecified reward the monitor must catch
    "online-dpo": ("online_dpo.yaml", []),
    "online-dpo-flipped": ("online_dpo.yaml", ["--data.init_args.reward", NEGATED_JUDGE]),
}
# what the flow-matching (SD3-shaped) base runs: the same configs, then configs/demo/sd3/<config>
# where the flow model needs other settings
FLOW_METHODS = ("dpo", "dpo-flipped", "kto", "kto-flipped", "grpo", "grpo-flipped")
FLOW_OPT_IN = ("dpo-shuffled", "kto-shuffled")  # the label-free controls, as on the UNet base
PREFERENCE_MODEL = "preference_model.yaml"
VALIDATION_LONG_SEED = 104723  # draws the validation long captions
HELD_OUT_SEED = 0  # draws the held-out captions (test, then validation)


def steps(n: int) -> list[str]:
    return ["--trainer.max_steps", str(n), "--data.init_args.batches_per_epoch", str(n)]


def seed_args(seed: int) -> list[str]:
    """One seed for everything: Lightning's, the module's noise and the data order."""
    return [
        f"--{key}={seed}"
        for key in ("seed_everything", "model.init_args.seed", "data.init_args.seed")
    ]


def batch_of(n: int) -> list[str]:
    return ["--data.init_args.batch_size", str(n)]


# ``--quick``: each config's run shortened (flags by "*", family or method, in that order)
QUICK_ARGS = {
    "dpo": steps(20),
    "kto": steps(30),
    "sft": steps(80),
    "rft-judge": steps(8) + batch_of(8),
    "rft-clip": steps(8) + batch_of(8),
    "grpo": steps(4) + batch_of(2),
    "online": ["--data.init_args.prompts_per_round", "16", "--trainer.max_epochs", "1"],
    "preference-model": steps(30),
}


@dataclass
class DemoConfig:
    out: str = "reports"
    artifacts: str = "artifacts/shapes"
    seeds: int = 3
    base: BaseConfig = field(default_factory=BaseConfig)
    pref_captions: int = 256
    # per family when None: 4 images of a caption, every two a pair (Pick-a-Pic, as Diffusion-DPO
    # trains on); the flow base 16, DPO pairing only the best and worst (Flow-GRPO's SD3.5 DPO
    # baseline pairs the best and worst of 24): on all pairs its flow DPO moved ~0.01
    images_per_caption: int | None = None
    best_worst_pairs: bool | None = None
    # 64 held-out captions x 8 sampling seeds (None: the flow base 32, whose samples vary more from
    # seed to seed): the changes stand clear of the luck of the draw; curve points are judged on
    # the first ``curve_seeds``
    eval_captions: int = 64
    eval_seeds: tuple | None = None
    curve_seeds: int = 4
    # "test": the report's captions and seeds; "validation": other held-out ones, for choosing
    # settings without looking at the report's set
    eval_set: str = "test"
    validation_seeds: tuple = tuple(range(2000, 2008))
    eval_every: int = 0  # judge curve points every N steps (0: at the end only)
    sample_steps: int = 10
    guidance: float = 4.0
    long_scenes: int = 2000  # long-caption SFT shards (rendered scenes, correct long captions)
    # opt-in (time): the label-free controls dpo-shuffled and kto-shuffled; the GRPO runs
    methods: tuple = (
        "dpo",
        "dpo-flipped",
        "kto",
        "kto-flipped",
        "sft-segment",
        "sft-truncate",
        "rft-judge",
        "rft-clip",
    )
    workers: int = 2  # processes running training runs side by side (one torch thread each)
    # "base": on-policy samples of the base (the demo); "rendered": renders of each caption's scene
    # with every colour wrong with probability 0.5
    # (known-good and known-bad images; toy-scale tests)
    pref_source: str = "base"
    # extra `align fit` flags by "*" (every method's run), family ("dpo", "sft", ...), method or
    # "preference-model"
    fit_args: dict = field(default_factory=dict)

    def __post_init__(self):
        flow = self.base.family != "sd15"
        if self.images_per_caption is None:
            self.images_per_caption = 16 if flow else 4
        if self.best_worst_pairs is None:
            self.best_worst_pairs = flow
        if self.eval_seeds is None:
            self.eval_seeds = tuple(range(1000, 1032 if flow else 1008))

    @property
    def sampling(self) -> dict:
        """How every model is sampled for judging (and the base for its preference data)."""
        return {"steps": self.sample_steps, "guidance": self.guidance}


def quick_config(family: str = "sd15", **kw) -> DemoConfig:
    """``--quick``: the same pipeline at smoke-test scale: a smaller base (its own cache,
    ``artifacts/shapes-quick``), one training seed, fewer captions and steps. Its numbers check that
    everything runs; the full demo's are the evidence. Sized to finish in 5 minutes on 2 cores."""
    kw.setdefault("seeds", 1)
    kw.setdefault("artifacts", default_artifacts(family, quick=True))
    kw.setdefault("fit_args", QUICK_ARGS)
    return DemoConfig(
        base=BaseConfig(family=family, scenes=2000, vae_steps=120, unet_steps=350),
        pref_captions=64,
        eval_captions=8,
        long_scenes=400,
        **kw,
    )


def default_artifacts(family: str = "sd15", quick: bool = False) -> str:
    """Where a family's world is cached: artifacts/shapes[-sd3][-quick]."""
    return "artifacts/shapes" + ("-sd3" if family == "sd3" else "") + ("-quick" if quick else "")


def caption_sets(cfg: DemoConfig) -> tuple[list[str], list[str]]:
    """(training captions for preference data, held-out evaluation captions), fixed by seeds.

    A quarter of the world's distinct captions, drawn at random (``HELD_OUT_SEED``), is held out of
    all preference training: its first ``eval_captions`` are the test set, the rest the validation
    set (``eval_set="validation"``). Training captions are the same for both sets (so what is tuned
    on validation is what the report trains): drawn from the world's scene distribution with that
    quarter removed, repeats allowed. Drawn from the whole pool, the quarter leaves training the
    one-object captions in their share of the world's scenes. With two objects per scene every
    held-out sentence also occurs in training captions, next to other sentences.
    """
    scenes = world.scenes(4000, seed=7919, max_objects=cfg.base.max_objects)
    pool = list(dict.fromkeys(world.caption(s) for s in scenes))  # distinct, in order
    held = random.Random(HELD_OUT_SEED).sample(pool, len(pool) // 4)
    test = held[: cfg.eval_captions]
    held_out = held[len(test) : 2 * len(test)] if cfg.eval_set == "validation" else test
    excluded = set(held)
    drawn = world.scenes(8 * cfg.pref_captions + 100, seed=104729, max_objects=cfg.base.max_objects)
    train = [c for c in (world.caption(s) for s in drawn) if c not in excluded]
    return train[: cfg.pref_captions], held_out


def judged_seeds(cfg: DemoConfig) -> list[int]:
    """The sampling seeds every model is judged with (``eval_set`` picks test or validation)."""
    return list(cfg.validation_seeds if cfg.eval_set == "validation" else cfg.eval_seeds)


def rendered_samples(captions: list[str], per_caption: int, seed: int = 0) -> np.ndarray:
    rng = random.Random(seed)
    scenes = [tuple(parse_caption(c)) for c in captions for _ in range(per_caption)]
    return np.stack(
        [np.asarray(world.render(world.noisy_scene(s, rng, 0.5, 0.0), rng)) for s in scenes]
    )


def preference_data(
    cfg: DemoConfig, base_pipe, train_caps: list[str], data_dir: Path, encoder=None
) -> dict:
    """Images for the training captions (on-policy or rendered), judged, written as pair and single
    shards with their flipped (and, when asked for, shuffled) controls; returns the data summary."""
    if cfg.pref_source == "base":
        seeds = list(range(cfg.images_per_caption))
        images = sample(base_pipe, train_caps, seeds, encoder=encoder, **cfg.sampling)
    else:
        images = rendered_samples(train_caps, cfg.images_per_caption)
    rec = build_records(train_caps, images, cfg.images_per_caption)
    variants = {"": {}, "-flipped": {"flipped": True}}
    if {"dpo-shuffled", "kto-shuffled"} & set(cfg.methods):
        variants["-shuffled"] = {"shuffled_seed": 0}
    for sfx, how in variants.items():
        pairs = pair_samples(rec, best_worst=cfg.best_worst_pairs, **how)
        write_pairs(data_dir / f"pairs{sfx}", pairs, shards=4)
        write_singles(data_dir / f"singles{sfx}", single_samples(rec, **how), shards=4)
    (data_dir / "train_captions.txt").write_text("".join(c + "\n" for c in train_caps))
    found = summary(rec, best_worst=cfg.best_worst_pairs)
    if found["decisive_pairs"] == 0 or not 0 < found["desirable"] < found["images"]:
        raise RuntimeError(
            f"the preference data has no signal (every pair a tie, or one KTO class "
            f"empty): {found}; train the base longer or sample more images"
        )
    return found


def long_caption_data(cfg: DemoConfig, base, data_dir: Path) -> tuple[list[str], dict]:
    """(held-out long captions, the base's ``evaluate_long`` on them per encoder); writes the
    long-caption SFT shards to ``data_dir/long``."""
    from align.demo.longalign import evaluate_long, long_eval_captions, write_long_caption_shards

    objects = cfg.base.max_objects
    long_caps = test_caps = long_eval_captions(cfg.eval_captions, max_objects=objects)
    if cfg.eval_set == "validation":
        long_caps = long_eval_captions(
            cfg.eval_captions, seed=VALIDATION_LONG_SEED, exclude=test_caps, max_objects=objects
        )
    write_long_caption_shards(
        data_dir / "long",
        cfg.long_scenes,
        seed=cfg.base.seed + 17,
        max_objects=objects,
        exclude=list(dict.fromkeys(test_caps + long_caps)),
    )
    results = {
        enc: evaluate_long(base, base.unet, enc, long_caps, judged_seeds(cfg), **cfg.sampling)
        for enc in ("segment", "truncate")
    }
    return long_caps, results


def fit_args(cfg: DemoConfig, name: str) -> list[str]:
    """``cfg.fit_args`` of a method: "*", then its family's, then its own (later flags win); the
    preference model takes its own only."""
    family = name.split("-")[0]
    keys = [name] if name == "preference-model" else ["*", family] + [name] * (name != family)
    return [str(a) for key in keys for a in cfg.fit_args.get(key, [])]


def fit(args: list[str], threads: int = 1) -> float:
    """One ``align fit`` (in this process, ``threads`` torch threads); returns its seconds."""
    from align.lightning_cli import run_lightning_cli

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    t = time.time()
    try:
        run_lightning_cli(["fit", *args])
    finally:
        torch.set_num_threads(before)
    return time.time() - t


def job_args(cfg: DemoConfig, method: str, seed: int) -> list[str]:
    """The ``align fit`` flags of one run (``ALIGN_DEMO`` names the artifacts)."""
    config, control = METHODS[method]
    # the shared config, then the family's own settings over it (configs/demo/sd3/<config>)
    layers = [c for c in (CONFIGS / config, CONFIGS / cfg.base.family / config) if c.is_file()]
    return [
        *(a for c in layers for a in ("--config", str(c))),
        *(a.format(art=cfg.artifacts) for a in control),
        *seed_args(seed),
        "--trainer.logger.init_args.name",
        method,
        "--trainer.logger.init_args.version",
        f"seed{seed}",
        *fit_args(cfg, method),
    ]


def longest_first(jobs: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """``jobs`` with the RFT runs first (they sample with gradients: the longest), so the runs left
    when one worker runs dry are short ones. A run's result does not depend on its order or
    worker."""
    return sorted(jobs, key=lambda job: not job[0].startswith("rft"))


def job_dir(cfg: DemoConfig, method: str, seed: int) -> Path:
    return Path(cfg.artifacts) / "runs" / method / f"seed{seed}"


def run_jobs(cfg: DemoConfig, jobs: list[tuple[str, int]]) -> dict[tuple[str, int], float]:
    """Every (method, seed) run, in ``workers`` spawned processes (longest first); returns each
    one's seconds, in job order (its results are in its run directory)."""
    for job in jobs:
        shutil.rmtree(job_dir(cfg, *job), ignore_errors=True)
    args = {job: job_args(cfg, *job) for job in jobs}
    if cfg.workers <= 1:
        return {job: fit(args[job]) for job in jobs}
    with ProcessPoolExecutor(max_workers=cfg.workers, mp_context=get_context("spawn")) as pool:
        futures = {job: pool.submit(fit, args[job]) for job in longest_first(jobs)}
        return {job: futures[job].result() for job in jobs}


def preference_model(cfg: DemoConfig, out_dir: Path) -> tuple[Path, float]:
    """The tiny CLIP preference model ``rft-clip`` optimises: ``configs/demo/preference_model.yaml``
    on the on-policy pairs and as many judge-labelled rendered pairs; returns (export, held-out
    pairwise accuracy on rendered pairs)."""
    from align.demo.reward_model import pairwise_accuracy, rendered_pairs, write_small_clip
    from align.rewards import build_reward

    objects, seed = cfg.base.max_objects, cfg.base.seed
    shutil.rmtree(out_dir, ignore_errors=True)
    write_small_clip(out_dir / "init", seed=seed)
    pairs = rendered_pairs(2000, seed=seed + 29, max_objects=objects)
    write_pairs(out_dir / "rendered-pairs", pairs, shards=4)
    args = ["--config", str(CONFIGS / PREFERENCE_MODEL), *seed_args(seed)]
    fit(args + fit_args(cfg, "preference-model"), threads=torch.get_num_threads())
    export = out_dir / "export" / "final"
    held_out = rendered_pairs(300, seed=seed + 31, max_objects=objects)
    acc = pairwise_accuracy(build_reward("denscore", str(export)), held_out)
    log(f"preference model: held-out pairwise accuracy {acc:.3f} on rendered judge pairs")
    return export, acc


def run_demo(cfg: DemoConfig, command: str = "align demo") -> dict:
    from align.models import load_components

    unknown = [m for m in cfg.methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown demo method(s) {unknown}; known: {', '.join(METHODS)}")
    flow_runs = FLOW_METHODS + FLOW_OPT_IN
    if cfg.base.family != "sd15" and not set(cfg.methods) <= set(flow_runs):
        raise ValueError(
            f"the {cfg.base.family} base runs {', '.join(flow_runs)}; "
            f"not {sorted(set(cfg.methods) - set(flow_runs))}"
        )
    if cfg.eval_set not in ("test", "validation"):
        raise ValueError(f"eval_set must be 'test' or 'validation', got {cfg.eval_set!r}")
    os.environ["ALIGN_DEMO"] = cfg.artifacts
    seeds = judged_seeds(cfg)
    timings: dict[str, float] = {}
    t_all = time.time()
    out, art = Path(cfg.out), Path(cfg.artifacts)
    out.mkdir(parents=True, exist_ok=True)

    t = time.time()
    base_dir = build_base(art / "base", cfg.base)
    timings["base model (train or reuse)"] = time.time() - t

    train_caps, eval_caps = caption_sets(cfg)
    base = load_components(str(base_dir))
    base_pipe = make_pipeline(base)
    # the flow base samples with its own text length (the UNets: the pipeline's encoding)
    encoder = prompt_encoder(base, cfg.base) if base.is_flow else None
    t = time.time()
    judged = {"short": evaluate(base_pipe, eval_caps, seeds, encoder=encoder, **cfg.sampling)}
    timings["evaluate base"] = time.time() - t
    log(
        f"base model: judge score {judged['short']['score']:.4f} on {len(eval_caps)} "
        f"{cfg.eval_set} captions x {len(seeds)} seeds"
    )

    t = time.time()
    pref_summary = preference_data(cfg, base_pipe, train_caps, art / "prefs", encoder)
    timings["preference data (sample + judge + shards)"] = time.time() - t
    log(f"preference data: {pref_summary}")

    long_caps: list[str] = []
    if any(m.startswith("sft-") for m in cfg.methods):
        t = time.time()
        long_caps, long_base = long_caption_data(cfg, base, art / "prefs")
        judged.update({f"long-{enc}": r for enc, r in long_base.items()})
        timings["long-caption data + base on long captions"] = time.time() - t
        log(
            "base model on long captions (facts past token 77): "
            f"{ {enc: r['score'] for enc, r in long_base.items()} }"
        )
    judge_set = {
        "eval_set": cfg.eval_set,
        "short": eval_caps,
        "long": long_caps,
        "seeds": seeds,
        "every": cfg.eval_every,
        "curve_seeds": cfg.curve_seeds,
        **cfg.sampling,
    }
    (art / "judge.json").write_text(json.dumps(judge_set, indent=2) + "\n")
    # the held-out captions as a prompt file (the reward-hacking monitor's)
    (art / "heldout_captions.txt").write_text("".join(c + "\n" for c in eval_caps))
    pref_accuracy = None
    if "rft-clip" in cfg.methods:
        t = time.time()
        _, pref_accuracy = preference_model(cfg, art / "preference_model")
        timings["tiny CLIP preference model"] = time.time() - t

    t = time.time()
    jobs = [(m, s) for m in cfg.methods for s in range(cfg.seeds)]
    log(
        f"{len(jobs)} runs of align fit ({', '.join(cfg.methods)} x {cfg.seeds} seeds) on "
        f"{cfg.workers} worker(s)"
    )
    seconds = run_jobs(cfg, jobs)
    timings[f"training runs ({len(jobs)}, {cfg.workers} workers)"] = time.time() - t
    timings["total"] = time.time() - t_all

    def base_on(method: str) -> dict:  # the base on the captions ``method`` is judged on
        return judged["long-" + method.split("-", 1)[1] if method.startswith("sft-") else "short"]

    curve_baselines = {
        m: first_seeds_score(base_on(m)["scores"], len(seeds), cfg.curve_seeds) for m in cfg.methods
    }
    results: dict = {m: [] for m in cfg.methods}
    samples: dict = {"base": judged["short"]["images"]}
    for (method, seed), secs in seconds.items():
        run = job_dir(cfg, method, seed)
        r = json.loads((run / "judge.json").read_text())
        result = {
            "seed": seed,
            "final": r["final"],
            "curve": [(0, curve_baselines[method]), *map(tuple, r["curve"])],
            "caption_scores": r["caption_scores"],
            "seconds": secs,
        }
        if (run / "reward_monitor.json").is_file():
            result["monitor"] = json.loads((run / "reward_monitor.json").read_text())
        results[method].append(result)
        if seed == 0:
            samples[method] = np.load(run / "judge_images.npy")
    summary_out = {
        "config": asdict(cfg),
        "base_score": judged["short"]["score"],
        "preferences": pref_summary,
        "baselines": {m: base_on(m)["score"] for m in cfg.methods},
        "curve_baselines": curve_baselines,
        "caption_baselines": {
            m: caption_means(base_on(m)["scores"], len(seeds)) for m in cfg.methods
        },
        "eval_sets": {
            m: "long captions, facts past token 77" if m.startswith("sft-") else "short captions"
            for m in cfg.methods
        },
        "base_long_score": {k[5:]: v["score"] for k, v in judged.items() if k.startswith("long-")}
        or None,
        "preference_model": pref_accuracy,
        "commands": {
            m: f"ALIGN_DEMO={cfg.artifacts} align fit "
            + " ".join(job_args(cfg, m, 0)).replace(f"{CONFIGS.parent.parent}{os.sep}", "")
            for m in cfg.methods
        },
        "results": results,
        "timings_s": timings,
        "eval_captions": eval_caps,
        "long_eval_captions": long_caps,
        "torch_threads": torch.get_num_threads(),
        "command": command,
    }
    (out / "demo.json").write_text(json.dumps(summary_out, indent=2, default=float) + "\n")
    from align.demo.report import write_report

    write_report(out, summary_out, samples, eval_caps, len(seeds))
    return summary_out
