"""Generate on-policy preference data: K images per prompt from a model's own sampler, scored by a
reward (or a weighted sum), written as Pick-a-Pic pairs (and KTO singles) the DPO and KTO configs
train on unchanged.

Usage: align data generate-pairs --model <preset|dir|hub id|export> --prompts <txt|jsonl|csv>
       --reward pickscore[,hps:0.5,...] --k 4 --out <dir> [--pairs best-worst|all]
       [--min-margin M] [--kto Q] [--reward-source NAME=PATH ...] [--seed S] [--steps N]
       [--scheduler ddim] [--guidance-scale G] [--batch-size B] [--dtype auto] [--device auto]

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

import io
import json
import math
from collections import Counter
from pathlib import Path

from align.data.convert_helpers import chunk_units, command_parser, fail
from align.data.writer import run_command, write_shards

SCORES = "scores.jsonl"


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
    p.add_argument("--scheduler", default="ddim")
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


def read_scores(path: Path) -> dict[tuple[int, int], dict]:
    """(prompt index, seed) -> its score line; a torn last line (interrupted write) is ignored."""
    found = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            found[(row["prompt_index"], row["seed"])] = row
    return found


def check_scorer(out: Path, scorer: dict) -> None:
    """Scores already in ``out`` must come from the same reward; record it for the next run."""
    path = out / "scorer.json"
    if path.is_file() and json.loads(path.read_text()) != scorer:
        raise ValueError(
            f"{out} holds scores of {json.loads(path.read_text())}, not {scorer}; "
            "choose another --out"
        )
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(scorer) + "\n")


def score_images(image_set, reward, out: Path, batch_size: int, progress: bool) -> Counter:
    """Score every image of ``image_set`` not yet in ``scores.jsonl``; returns skip counts."""
    from tqdm.auto import tqdm

    from align.eval.scoring import load_image

    path = out / SCORES
    done, skipped = read_scores(path), Counter()
    todo = [e for e in image_set.entries if e.key not in done]
    bar = tqdm(total=len(todo), desc="scoring", unit="img", disable=not progress)
    with path.open("a") as handle:
        if path.stat().st_size and not path.read_bytes().endswith(b"\n"):
            handle.write("\n")  # after a torn line (an interrupted run), start a new one
        for start in range(0, len(todo), batch_size):
            batch, images = [], []
            for entry in todo[start : start + batch_size]:
                image, _ = load_image(entry.path)
                if image is None:
                    skipped["unreadable_image"] += 1
                    continue
                batch.append(entry)
                images.append(image)
            if batch:
                total, parts = reward(images, [image_set.prompt(e) for e in batch])
                for j, entry in enumerate(batch):
                    row = {
                        "prompt_index": entry.prompt_index,
                        "seed": entry.seed,
                        "score": float(total[j]),
                        "scores": {k: float(v[j]) for k, v in parts.items()},
                    }
                    handle.write(json.dumps(row) + "\n")
                handle.flush()
            bar.update(len(todo[start : start + batch_size]))
    bar.close()
    return skipped


def group_scores(rows: dict, skipped: Counter) -> dict[int, list[dict]]:
    """Prompt index -> its finite-scored images, best first (ties: lower seed first)."""
    groups: dict[int, list[dict]] = {}
    for row in rows.values():
        if not math.isfinite(row["score"]):
            skipped["nonfinite_score"] += 1
            continue
        groups.setdefault(row["prompt_index"], []).append(row)
    for rows_ in groups.values():
        rows_.sort(key=lambda r: (-r["score"], r["seed"]))
    return groups


def plan_pairs(groups: dict, mode: str, min_margin: float, skipped: Counter) -> list[tuple]:
    """(prompt index, better row, worse row) of every pair to write."""
    pairs = []
    for index in sorted(groups):
        rows = groups[index]
        if len(rows) < 2:
            skipped["too_few_images"] += 1
            continue
        candidates = (
            [(rows[0], rows[-1])]
            if mode == "best-worst"
            else [(a, b) for i, a in enumerate(rows) for b in rows[i + 1 :]]
        )
        for better, worse in candidates:
            if better["score"] - worse["score"] <= min_margin:
                skipped["tie"] += 1
            else:
                pairs.append((index, better, worse))
    return pairs


def plan_singles(groups: dict, q: float, skipped: Counter) -> list[tuple]:
    """(prompt index, row, desirable) of every KTO single to write."""
    singles = []
    for index in sorted(groups):
        rows = groups[index]
        if len(rows) < 2 or rows[0]["score"] == rows[-1]["score"]:
            skipped["all_tied"] += 1
            continue
        top = math.ceil(q * len(rows))
        singles += [(index, row, rank < top) for rank, row in enumerate(rows)]
    return singles


def jpeg(path: Path) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    with Image.open(path) as image:
        image.convert("RGB").save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def convert_pairs(payload: tuple, need):
    """Writer converter: a chunk of planned pairs (image 0 is the better one for even rows, the
    worse for odd: the data module must not learn a position)."""
    root, prompts, model, rows = payload
    for j, (index, better, worse) in enumerate(rows):
        if not need(j):
            yield None
            continue
        first, second = (better, worse) if j % 2 == 0 else (worse, better)
        meta = {
            "caption": prompts[index],
            "label_0": 1.0 if first is better else 0.0,
            "label_1": 0.0 if first is better else 1.0,
            "image_0_uid": uid(first),
            "image_1_uid": uid(second),
            "model_0": model,
            "model_1": model,
            "score_0": first["score"],
            "score_1": second["score"],
            "scores_0": first["scores"],
            "scores_1": second["scores"],
        }
        yield {
            "jpg_0.jpg": jpeg(root / image_name(first)),
            "jpg_1.jpg": jpeg(root / image_name(second)),
            "json": meta,
        }


def convert_singles(payload: tuple, need):
    root, prompts, model, rows = payload
    for j, (index, row, desirable) in enumerate(rows):
        if not need(j):
            yield None
            continue
        meta = {
            "caption": prompts[index],
            "label": desirable,
            "image_uid": uid(row),
            "wins": int(desirable),
            "losses": int(not desirable),
            "model": model,
            "score": row["score"],
            "scores": row["scores"],
        }
        yield {"jpg": jpeg(root / image_name(row)), "json": meta}


def uid(row: dict) -> str:
    return f"{row['prompt_index']:05d}_{row['seed']}"


def image_name(row: dict) -> str:
    return uid(row) + ".png"


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
    scoring = score_images(image_set, reward, out, args.batch_size, not args.no_progress)
    groups = group_scores(read_scores(out / SCORES), scoring)
    pair_skips = Counter(scoring)
    pairs = plan_pairs(groups, args.pairs, args.min_margin, pair_skips)
    if not pairs:
        return fail(f"no pair has a score gap above --min-margin ({dict(pair_skips)})", prog)
    context = (out / "images", prompts, args.model)
    status = write(args, out / "pairs", "pairs", convert_pairs, context, pairs, pair_skips)
    if status or args.kto is None:
        return status
    single_skips = Counter(scoring)
    singles = plan_singles(groups, args.kto, single_skips)
    return write(args, out / "singles", "singles", convert_singles, context, singles, single_skips)


def write(
    args, folder: Path, prefix: str, convert, context: tuple, rows: list, skipped: Counter
) -> int:
    source = {
        "prompts": str(args.prompts),
        "model": args.model,
        "reward": args.reward,
        "k": args.k,
        "pairs": args.pairs,
        "min_margin": args.min_margin,
        "kto": args.kto,
        "seed": args.seed,
        "rows": len(rows),
    }
    units = chunk_units(rows, args.shard_size, prefix, lambda chunk: (*context, chunk))
    return run_command(
        lambda: write_shards(
            folder,
            command=f"generate-pairs {prefix}",
            prefix=prefix,
            source=source,
            units=units,
            convert=convert,
            shard_size=args.shard_size,
            workers=args.workers,
            progress=not args.no_progress,
            pre_skipped=skipped,
        )
    )
