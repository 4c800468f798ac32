"""Session 7 diagnostic (docs/demo/findings.md §10): the most a perfect signal could teach in a few hundred
steps. Plain SFT of the demo's base on *correct* rendered scenes with their correct short captions (2000 scenes,
none with a test caption; full UNet, 150 steps of 16, frozen text encoder, CLIP's standard encoding), judged on
the report's 64 test captions x 16 seeds.

    python docs/demo/diagnostics/clean_sft.py ARTIFACTS REPORT_DIR OUT    # a finished `align demo`'s artifacts
                                                                          # and report (for the base's scores)
"""
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import torch

RUNS = [(lr, 150, seed, drop) for drop in (0.0, 0.1) for lr in (1e-4, 2e-5) for seed in (0, 1)]


def write_shards(out: Path) -> None:
    from align.demo.longalign import write_long_caption_shards
    from align.demo.run import DemoConfig, caption_sets

    _, test = caption_sets(DemoConfig())
    write_long_caption_shards(out, 2000, seed=5, max_objects=2, exclude=test, long=False)


def job(art: str, shards: str, run: tuple) -> dict:
    from align.demo.evaluate import caption_means, evaluate, make_pipeline
    from align.demo.longalign import train_sft
    from align.demo.methods import base_components
    from align.demo.run import DemoConfig, caption_sets

    torch.set_num_threads(1)
    lr, steps, seed, drop = run
    cfg = DemoConfig()
    _, test = caption_sets(cfg)
    t = time.time()
    module = train_sft(f"{art}/base", shards, "truncate", seed, steps, lr, 16, caption_dropout=drop)
    res = evaluate(make_pipeline(base_components(f"{art}/base"), unet=module.unet), test, list(cfg.eval_seeds),
                   steps=cfg.sample_steps, guidance=cfg.guidance)
    return {"lr": lr, "steps": steps, "seed": seed, "caption_dropout": drop, "score": res["score"],
            "caption_scores": caption_means(res["scores"], len(cfg.eval_seeds)), "seconds": time.time() - t}


if __name__ == "__main__":
    art, report, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    write_shards(out / "shards")
    with ProcessPoolExecutor(2, mp_context=get_context("spawn")) as pool:
        results = list(pool.map(job, [art] * len(RUNS), [str(out / "shards")] * len(RUNS), RUNS))
    from align.demo.report import judging_error

    summary = json.loads((report / "demo.json").read_text())
    base, base_caps = summary["base_score"], summary["caption_baselines"]["dpo"]
    for r in results:
        print(f"lr {r['lr']:g}, caption dropout {r['caption_dropout']}, seed {r['seed']}: {r['score']:.4f} "
              f"(change {r['score'] - base:+.4f}, judging SE {judging_error([r], base_caps):.4f})")
    (out / "clean_sft.json").write_text(json.dumps(results, indent=1))
