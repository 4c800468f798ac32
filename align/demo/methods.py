"""One training run of one method for one seed: the demo's unit of work, run in a worker process.

A run gets a ``RunContext`` (plain paths and numbers, so it pickles into a worker), trains through the real
LightningModule of its method with a ``JudgeCurve`` callback that samples the policy on held-out captions every
``eval_every`` steps and at the end, and returns ``{"seed", "final", "curve", "images"}``. ``METHODS`` maps a
method name to its runner; ``-flipped`` variants train on the same data with the preference reversed (the control),
``-shuffled`` ones with random labels (the label-free control: what training on these images does by itself).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from functools import partial

import lightning as L
import numpy as np
import torch

from align.demo import world
from align.demo.base import log


@dataclass
class MethodConfig:
    steps: int = 120
    lr: float = 1e-5
    beta: float = 2000.0
    batch_size: int = 8
    extra: dict = field(default_factory=dict)  # method-specific options (LoRA rank, DDIM steps, ...)
    eval_every: int | None = None  # judge this method every N steps (None: the demo's ``eval_every``)


@dataclass
class RunContext:
    """Everything a worker needs for one run (picklable)."""

    base_dir: str
    run_dir: str
    shards: dict  # name -> shard directory ("pairs", "pairs-flipped", "singles", "singles-flipped", "long", ...)
    eval_captions: list
    long_eval_captions: list
    train_captions: list
    eval_seeds: list  # the final judging's sampling seeds; curve points use the first ``curve_seeds`` of them
    sample_steps: int
    guidance: float
    eval_every: int
    methods: dict  # method family ("dpo", "kto", "sft", "rft") or method ("rft-clip") -> MethodConfig
    # made by the driver: base scores ("base_score", "base_curve_score", "base_long_score",
    # "base_long_curve_score") and paths (e.g. the preference model's export)
    extra: dict = field(default_factory=dict)
    curve_seeds: int | None = None  # None: every point of the curve on all of ``eval_seeds``


_COMPONENTS: dict = {}


def base_components(base_dir: str):
    """The base model's components, loaded once per process (runs only read them: they build their own copies)."""
    from align.models import load_components

    if base_dir not in _COMPONENTS:
        _COMPONENTS[base_dir] = load_components(base_dir)
    return _COMPONENTS[base_dir]


class JudgeCurve(L.Callback):
    """Judges the module every ``every`` steps on the curve's seeds and once at the end on all ``seeds``.

    ``evaluate_fn(module, seeds)`` returns ``evaluate``'s dict. The curve, ``[(step, score)]``, is judged on the
    first ``curve_seeds`` sampling seeds at every point (the end's point is that subset of the end's images), so
    its points compare; ``final`` is the score on all seeds. Why two: with 8 seeds a model's change moved by
    0.006-0.016 (sd) with the choice of seeds, as much as the methods' effects (docs/demo/findings.md §9), so the
    number the report judges a method by is averaged over more seeds, while the curve's points stay affordable.
    Judging runs on forked random states, so a run's training is the same whether and how often it is judged
    (it was not: one judging at step 75 moved RFT's final score by up to 0.06, findings §9).
    """

    def __init__(self, evaluate_fn, every: int, seeds: list[int], curve_seeds: int | None = None,
                 start: tuple[int, float] | None = None, label: str = ""):
        self.evaluate_fn, self.every, self.seeds, self.label = evaluate_fn, every, list(seeds), label
        self.curve_seeds = min(curve_seeds or len(self.seeds), len(self.seeds))
        self.curve: list[tuple[int, float]] = [start] if start else []
        self.final: float | None = None
        self.last: dict | None = None

    def _eval(self, step: int, module, seeds: list[int]) -> None:
        from align.demo.evaluate import first_seeds_score

        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):  # training draws the same numbers, judged or not
            res = self.evaluate_fn(module, seeds)
        random.setstate(py_state)
        np.random.set_state(np_state)
        point = first_seeds_score(res["scores"], len(seeds), self.curve_seeds)
        self.curve = [p for p in self.curve if p[0] != step] + [(step, point)]
        self.last = res
        log(f"  {self.label} step {step}: judge {res['score']:.4f} on {len(seeds)} seeds "
            f"({res['seconds']:.0f}s to sample)")

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        step = trainer.global_step
        if self.every and step % self.every == 0 and step < trainer.max_steps:  # the last step: on_train_end
            self._eval(step, module, self.seeds[:self.curve_seeds])

    def on_train_end(self, trainer, module):
        self._eval(trainer.global_step, module, self.seeds)
        self.final = self.last["score"]


def fit(module, data, steps: int, run_dir: str, name: str, seed: int, callbacks: list) -> None:
    """A CPU Lightning fit with the demo's settings: CSV metrics, no checkpoints, gradient clipping at 1."""
    logger = L.pytorch.loggers.CSVLogger(run_dir, name=name, version=f"seed{seed}")
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=logger, log_every_n_steps=5,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        gradient_clip_val=1.0, callbacks=callbacks, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, data)


def eval_every(ctx: RunContext, mcfg: MethodConfig) -> int:
    return ctx.eval_every if mcfg.eval_every is None else mcfg.eval_every


def short_caption_curve(ctx: RunContext, mcfg: MethodConfig, label: str) -> JudgeCurve:
    """The curve on the held-out short captions, sampling the module's UNet with the base's other parts."""
    from align.demo.evaluate import evaluate, make_pipeline

    base = base_components(ctx.base_dir)

    def evaluate_fn(module, seeds):
        return evaluate(make_pipeline(base, unet=module.unet), ctx.eval_captions, seeds, steps=ctx.sample_steps,
                        guidance=ctx.guidance)

    return JudgeCurve(evaluate_fn, eval_every(ctx, mcfg), ctx.eval_seeds, ctx.curve_seeds,
                      start=(0, ctx.extra["base_curve_score"]), label=label)


def loader_args(mcfg: MethodConfig, seed: int) -> dict:
    return dict(batch_size=mcfg.batch_size, resolution=world.SIZE, crop="center", flip_prob=0.0, num_workers=0,
                batches_per_epoch=mcfg.steps, seed=seed)


def run_preference(ctx: RunContext, method: str, seed: int) -> JudgeCurve:
    """DPO on judge-labelled pairs, or KTO on judge-labelled singles (``-flipped``: labels reversed;
    ``-shuffled``: random labels)."""
    from align.data.kto import KTODataModule
    from align.data.pickapic import PickAPicDataModule
    from align.modules import DPOModule, KTOModule

    family = method.split("-")[0]
    mcfg = ctx.methods[family]
    variant = method[len(family):]  # "", "-flipped" or "-shuffled": which shards
    common = dict(model=ctx.base_dir, optimizer=partial(torch.optim.AdamW, lr=mcfg.lr, weight_decay=0.0),
                  beta=mcfg.beta, seed=seed, **mcfg.extra)
    if family == "dpo":
        module = DPOModule(**common)
        data = PickAPicDataModule(train_shards=ctx.shards["pairs" + variant], **loader_args(mcfg, seed))
    else:
        module = KTOModule(**common)
        data = KTODataModule(shards=ctx.shards["singles" + variant], p_desirable=0.5, **loader_args(mcfg, seed))
    curve = short_caption_curve(ctx, mcfg, f"{method}/{seed}")
    fit(module, data, mcfg.steps, ctx.run_dir, method, seed, [curve])
    return curve


def run_sft(ctx: RunContext, method: str, seed: int) -> JudgeCurve:
    """LongAlign SFT on long-caption shards with segment encoding (``sft-segment``) or CLIP's 77-token
    truncation (``sft-truncate``), judged on held-out long captions for the facts past token 77."""
    from align.demo.longalign import module_eval, train_sft

    mcfg = ctx.methods["sft"]
    encoder = method.split("-", 1)[1]

    def evaluate_fn(module, seeds):
        return module_eval(module, ctx.long_eval_captions, seeds, steps=ctx.sample_steps, guidance=ctx.guidance)

    curve = JudgeCurve(evaluate_fn, eval_every(ctx, mcfg), ctx.eval_seeds, ctx.curve_seeds,
                       start=(0, ctx.extra["base_long_curve_score"][encoder]), label=f"{method}/{seed}")
    train_sft(ctx.base_dir, ctx.shards["long"], encoder, seed, mcfg.steps, mcfg.lr, mcfg.batch_size, [curve],
              ctx.run_dir, **mcfg.extra)
    return curve


def run_rft(ctx: RunContext, method: str, seed: int) -> JudgeCurve:
    """Reward fine-tuning of a new LoRA on the training captions: ``rft-judge`` maximises the judge's
    differentiable relaxation, ``rft-clip`` the tiny CLIP preference model trained on the judge's pairs (with
    LongAlign's S_w)."""
    from align.demo.rft import train_rft

    mcfg = ctx.methods.get(method, ctx.methods["rft"])
    reward, source = ("shapes-judge", None) if method == "rft-judge" else ("denscore", ctx.extra["preference_model"])
    curve = short_caption_curve(ctx, mcfg, f"{method}/{seed}")
    train_rft(ctx.base_dir, ctx.train_captions, reward, source, seed, mcfg.steps, mcfg.lr, mcfg.batch_size, [curve],
              ctx.run_dir, guidance=ctx.guidance, **mcfg.extra)
    return curve


METHODS = {
    "dpo": run_preference,
    "dpo-flipped": run_preference,
    "dpo-shuffled": run_preference,  # the label-free control (docs/demo/findings.md §8)
    "kto": run_preference,
    "kto-flipped": run_preference,
    "kto-shuffled": run_preference,  # KTO's label-free control; not in the default report (time)
    "sft-segment": run_sft,
    "sft-truncate": run_sft,
    "rft-judge": run_rft,
    "rft-clip": run_rft,
}


def run_job(ctx: RunContext, method: str, seed: int, threads: int = 1) -> dict:
    """Worker entry point: one method, one seed. Returns the curve, the final score (also per held-out caption,
    for the report's judging error) and the final samples."""
    torch.set_num_threads(threads)
    L.seed_everything(seed, workers=True, verbose=False)
    t = time.time()
    log(f"{method} seed {seed}: start")
    curve = METHODS[method](ctx, method, seed)
    from align.demo.evaluate import caption_means

    return {"method": method, "seed": seed, "final": curve.final, "curve": curve.curve,
            "caption_scores": caption_means(curve.last["scores"], len(ctx.eval_seeds)),
            "images": curve.last["images"], "seconds": time.time() - t}
