"""Generate on-policy preference data: K images per prompt from a model's own sampler, scored by a
reward (or a weighted sum), written as Pick-a-Pic pairs (and KTO singles) the DPO and KTO configs
train on unchanged.

Usage: align data generate-pairs --model <preset|dir|hub id|export> --prompts <txt|jsonl|csv>
       --reward pickscore[,hps:0.5,...] --k 4 --out <dir> [--pairs best-worst|all]
       [--min-margin M] [--kto Q] [--reward-source NAME=PATH ...] [--seed S] [--steps N]
       [--scheduler NAME] [--guidance-scale G] [--batch-size B] [--dtype auto] [--device auto]

Layout of ``--out`` (every stage resumes where it stopped):

* ``images/``: the ``align sample`` image set (image j of prompt i from seed S + j);
* ``scores.jsonl``: one line per image (prompt index, seed, total and each reward's score),
  appended as images are scored; ``scorer.json`` names the reward (a rerun with another one
  is refused);
* ``pairs/``: pair shards. ``best-worst`` (default) pairs each prompt's best and worst image,
  ``all`` every two images; a pair whose totals differ by ``--min-margin`` or less is skipped
  (``tie``). ``label_0`` is 1 when image 0 scored higher; every score rides in the json;
* ``singles/`` (``--kto Q``): every image of a prompt labelled desirable when it is among the
  ceil(Q * K) best of its prompt, undesirable otherwise; prompts whose images all tie are skipped.

An image with a non-finite score is skipped and counted (``nonfinite_score``), as is an unreadable
one; a prompt left with fewer than 2 images makes no pair.
"""

from __future__ import annotations

from pathlib import Path

from align.data.convert_helpers import command_parser, fail
from align.data.generated import check_scorer, plan, score_images, write_planned
from align.data.writer import run_command


def parser():
    p = command_parser("generate-pairs", __doc__)
    p.add_argument("--model", required=True, help="preset, diffusers dir, hub id or align export")
    p.add_argument("--prompts", required=True, help="prompt set: .txt, .jsonl, .csv, .parquet")
    p.add_argument("--reward", required=True, help="a registry reward or a weighted sum")
    p.add_argument(
        "--reward-source",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="weights of one reward (local dir or hub id; default: the published ones)",
    )
    p.add_argument("--k", type=int, default=4, help="images per prompt (>= 2)")
    p.add_argument("--pairs", choices=("best-worst", "all"), default="best-worst")
    p.add_argument("--min-margin", type=float, default=0.0, help="score gap a pair needs")
    p.add_argument("--kto", type=float, default=None, metavar="Q", help="also write KTO singles")
    p.add_argument("--seed", type=int, default=0, help="seed of image 0; image j uses seed + j")
    p.add_argument(
        "--scheduler",
        default=None,
        help="as align sample: default unipc (SD1.5, SDXL), flow-euler (SD3, FLUX.1)",
    )
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance-scale", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--resolution", type=int, default=None, help="image side (default: native)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--device", default="auto")
    p.add_argument("--prompt-column", default=None)
    p.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    p.add_argument("--out", required=True, help="output folder (created; resumable)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--workers", type=int, default=1, help="processes writing shards")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    prog = "align data generate-pairs"
    if args.k < 2:
        return fail(f"--k must be at least 2 (a pair needs two images), got {args.k}", prog)
    if args.kto is not None and not 0 < args.kto < 1:
        return fail(f"--kto is the desirable fraction, in (0, 1); got {args.kto}", prog)
    sources = dict(item.split("=", 1) for item in args.reward_source if "=" in item)
    if len(sources) != len(args.reward_source):
        return fail("--reward-source takes NAME=PATH", prog)

    from align.data.prompt_files import PromptSetError, read_prompts
    from align.eval.layout import ImageSetError, scan_image_set
    from align.eval.sampling import SampleConfig, resolve_device, sample_images
    from align.models import ModelSourceError
    from align.rewards.weighted import WeightedReward

    out = Path(args.out)
    try:
        prompts = read_prompts(args.prompts, column=args.prompt_column, limit=args.limit)
        if not prompts:
            raise PromptSetError(f"{args.prompts} holds no prompts")
        device = resolve_device(args.device)
        reward = WeightedReward(args.reward, sources or None).to(device)  # fails before sampling
        config = SampleConfig(
            checkpoint=args.model,
            scheduler=args.scheduler,
            steps=args.steps,
            guidance_scale=args.guidance_scale,
            images_per_prompt=args.k,
            seed=args.seed,
            batch_size=args.batch_size,
            height=args.resolution,
            width=args.resolution,
            device=args.device,
            dtype=args.dtype,
            progress=not args.no_progress,
        )
        check_scorer(out, {"reward": args.reward, "sources": sources})
        sample_images(prompts, out / "images", config, prompt_source=str(args.prompts))
        image_set = scan_image_set(out / "images")
    except (PromptSetError, ImageSetError, ModelSourceError, ValueError) as err:
        return fail(str(err), prog)
    paths = {entry.key: entry.path for entry in image_set.entries}
    progress = not args.no_progress
    skipped = score_images(paths, prompts, reward, out, args.batch_size, progress)
    pairs, singles, pair_skips, single_skips = plan(
        out, args.pairs, args.min_margin, args.kto, skipped
    )
    if not pairs:
        return fail(f"no pair has a score gap above --min-margin ({dict(pair_skips)})", prog)
    source = {
        "prompts": str(args.prompts),
        "model": args.model,
        "reward": args.reward,
        "k": args.k,
        "pairs": args.pairs,
        "min_margin": args.min_margin,
        "kto": args.kto,
        "seed": args.seed,
    }
    context = (paths, prompts, args.model)
    options = dict(shard_size=args.shard_size, workers=args.workers, progress=progress)
    outputs = [("pairs", pairs, pair_skips), ("singles", singles, single_skips)]
    for kind, rows, skips in outputs[: 1 if singles is None else 2]:
        status = run_command(
            lambda: write_planned(out / kind, kind, rows, context, source, skips, **options)
        )
        if status:
            return status
    return 0
