"""Session 10 check (docs/demo/findings.md §12): fewer training steps for DPO and both RFTs, judged on the
validation split. One run per method and seed gives both step counts: DPO trains 50 steps and is judged at 25,
rft-judge 40 (judged at 25), rft-clip 60 (judged at 40); the learning rates are constant, so a run's model at
step 25 is the model a 25-step run ends with. Curve points are judged on every validation seed (``curve_seeds``),
so each point is comparable with the final judging. 3 training seeds, the report's other settings.

    python docs/demo/diagnostics/step_counts.py OUT [BASE]   # ~13 min with a trained base, ~23 min without

BASE: a trained demo base to reuse (``artifacts/shapes/base`` after ``make demo``); it is linked into OUT/art.
"""
import sys
from dataclasses import replace
from pathlib import Path

from align.demo.run import DemoConfig, run_demo

if __name__ == "__main__":  # the training runs' spawned workers import this file: they must not run it
    out = Path(sys.argv[1])
    if len(sys.argv) > 2:
        (out / "art").mkdir(parents=True, exist_ok=True)
        link = out / "art" / "base"
        if not link.exists():
            link.symlink_to(Path(sys.argv[2]).resolve())
    cfg = DemoConfig()
    cfg = replace(cfg, out=str(out / "report"), artifacts=str(out / "art"), eval_set="validation",
                  curve_seeds=len(cfg.validation_seeds), methods=("dpo", "dpo-flipped", "rft-judge", "rft-clip"),
                  dpo=replace(cfg.dpo, steps=50, eval_every=25), rft=replace(cfg.rft, steps=40, eval_every=25),
                  rft_clip=replace(cfg.rft_clip, steps=60, eval_every=40))
    run_demo(cfg, command="docs/demo/diagnostics/step_counts.py " + " ".join(sys.argv[1:]))
