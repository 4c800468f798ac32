"""Session 7 diagnostic (docs/demo/findings.md §10): the report's DPO, KTO, their flipped controls and RFT-judge,
trained exactly as ``align demo`` trains them, judged on 64 of their own *training* captions x 8 sampling seeds.

    python docs/demo/diagnostics/training_captions.py ARTIFACTS OUT     # ARTIFACTS: a finished `align demo`'s

Judging runs on forked random states, so these are the report's models (same settings, seeds and shards).
"""
import dataclasses
import json
import sys
import time

import torch

from align.demo.evaluate import caption_means, evaluate, make_pipeline
from align.demo.report import judging_error, mean_spread
from align.demo.run import DemoConfig, RunContext, caption_sets, run_jobs
from align.models import load_components

METHODS = ("rft-judge", "dpo", "dpo-flipped", "kto", "kto-flipped")

if __name__ == "__main__":
    art, out = sys.argv[1], sys.argv[2]
    torch.set_num_threads(2)
    cfg = DemoConfig()
    train_caps, _ = caption_sets(cfg)
    judged = list(dict.fromkeys(train_caps))[:64]  # the first 64 distinct training captions
    seeds = list(range(1000, 1008))
    t = time.time()
    base = evaluate(make_pipeline(load_components(f"{art}/base")), judged, seeds, steps=cfg.sample_steps,
                    guidance=cfg.guidance)
    shards = {k: f"{art}/prefs/{k}" for k in ("pairs", "pairs-flipped", "singles", "singles-flipped")}
    methods = {"dpo": dataclasses.replace(cfg.dpo, eval_every=0), "kto": cfg.kto, "sft": cfg.sft, "rft": cfg.rft,
               "rft-clip": cfg.rft_clip}
    ctx = RunContext(base_dir=f"{art}/base", run_dir=f"{out}/runs", shards=shards, eval_captions=judged,
                     long_eval_captions=[], train_captions=train_caps, eval_seeds=seeds,
                     sample_steps=cfg.sample_steps, guidance=cfg.guidance, eval_every=0, methods=methods,
                     extra={"base_score": base["score"], "base_curve_score": base["score"]})
    done = run_jobs(ctx, [(m, s) for m in METHODS for s in range(cfg.seeds)], workers=2)
    base_caps = caption_means(base["scores"], len(seeds))
    print(f"base {base['score']:.4f} on {len(judged)} training captions x {len(seeds)} seeds")
    for m in METHODS:
        runs = [r for r in done if r["method"] == m]
        mean, sd = mean_spread([r["final"] for r in runs])
        print(f"{m}: {mean:.4f} ± {sd:.4f}, change {mean - base['score']:+.4f}, judging SE "
              f"{judging_error(runs, base_caps):.4f}, per seed {[round(r['final'], 4) for r in runs]}")
    json.dump({"base": base["score"], "judged": judged, "runs": [{k: r[k] for k in ("method", "seed", "final")}
                                                                   for r in done]},
              open(f"{out}/training_captions.json", "w"), indent=1)
    print(f"{time.time() - t:.0f} s")
