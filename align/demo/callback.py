"""The judge as a callback of any ``align fit`` run of the shapes world (``configs/demo``)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
from lightning.pytorch.utilities.seed import isolate_rng

from align.demo.evaluate import caption_means, evaluate, first_seeds_score, make_pipeline
from align.demo.longalign import evaluate_long


class ShapesJudge(L.Callback):
    """The demo's evaluator in any ``align fit`` run of the shapes world: samples the policy on the
    held-out captions of ``judge_set`` (a JSON the demo writes beside its base: ``short`` and
    ``long`` captions, ``seeds``, ``curve_seeds``, ``steps``, ``guidance``) and judges every image.

    ``captions``: ``short`` (every fact judged) or ``long`` (facts past token 77 only, each sampled
    with the module's own prompt encoder). Every ``every`` steps of the judge set (0: never) a curve
    point is judged on the first ``curve_seeds`` seeds; at the end all seeds are judged,
    ``demo/judge`` is logged and the run directory gets ``judge.json`` (``final``, ``curve``,
    ``caption_scores``) and ``judge_images.npy``. Judging runs on forked random states: training
    draws the same numbers whether and how often it is judged.
    """

    def __init__(self, judge_set: str, captions: str = "short"):
        if captions not in ("short", "long"):
            raise ValueError(f"captions must be 'short' or 'long', got {captions!r}")
        path = Path(judge_set)
        if not path.is_file():
            raise FileNotFoundError(
                f"no judge set at {path}: `align demo` writes it with the world"
            )
        spec = json.loads(path.read_text())
        self.captions, self.long, self.every = spec[captions], captions == "long", spec["every"]
        self.seeds, self.steps, self.guidance = list(spec["seeds"]), spec["steps"], spec["guidance"]
        self.curve_seeds = min(spec.get("curve_seeds") or len(self.seeds), len(self.seeds))
        self.curve: list[tuple[int, float]] = []
        self.final: float | None = None
        self.last: dict | None = None

    def evaluate(self, module, seeds: list[int]) -> dict:
        kw = dict(steps=self.steps, guidance=self.guidance)
        if self.long:
            return evaluate_long(
                module.components, module.unet, module.prompt_encoder, self.captions, seeds, **kw
            )
        # a flow model samples with the module's text length (the UNets: the pipeline's encoding)
        encoder = module.prompt_encoder if module.components.is_flow else None
        pipe = make_pipeline(module.components, unet=module.unet)
        return evaluate(pipe, self.captions, seeds, encoder=encoder, **kw)

    def _judge(self, step: int, module, seeds: list[int]) -> None:
        with isolate_rng(include_cuda=False):  # Python's, NumPy's and torch's CPU generator
            res = self.evaluate(module, seeds)
        point = first_seeds_score(res["scores"], len(seeds), self.curve_seeds)
        self.curve = [p for p in self.curve if p[0] != step] + [(step, point)]
        self.last = res

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        step = trainer.global_step
        if self.every and step % self.every == 0 and step < trainer.max_steps:  # last: at the end
            self._judge(step, module, self.seeds[: self.curve_seeds])

    def on_train_end(self, trainer, module):
        self._judge(trainer.global_step, module, self.seeds)
        self.final = self.last["score"]
        for logger in trainer.loggers:
            logger.log_metrics({"demo/judge": self.final}, step=trainer.global_step)
        out = Path(trainer.log_dir or trainer.default_root_dir)
        out.mkdir(parents=True, exist_ok=True)
        result = {
            "final": self.final,
            "curve": self.curve,
            "caption_scores": caption_means(self.last["scores"], len(self.seeds)),
        }
        (out / "judge.json").write_text(json.dumps(result, indent=2) + "\n")
        np.save(out / "judge_images.npy", self.last["images"])
        print(
            f"[demo] judge {self.final:.4f} on {len(self.captions)} held-out captions x "
            f"{len(self.seeds)} seeds -> {out / 'judge.json'}",
            flush=True,
        )
