"""Preference data from a model's own samples: score images with a reward, pair them, write shards.

Shared by ``align data generate-pairs`` (images rendered by ``align sample``) and the online data
module (images rendered by the policy each round). Images are given as ``(prompt index, seed) ->
path``. Scores go to ``<out>/scores.jsonl`` one line per image as they are computed (a rerun scores
only what is missing; a torn last line is ignored), ``<out>/scorer.json`` names the reward (scores
of another reward are refused). Pairs: ``best-worst`` (each prompt's best and worst image) or
``all`` (every two), skipped as ``tie`` when the totals differ by ``min_margin`` or less; the
better image alternates between positions 0 and 1. KTO singles: the ceil(q K) best images of a
prompt desirable, the rest undesirable; prompts whose images all tie are skipped.
"""

from __future__ import annotations

import io
import json
import math
from collections import Counter
from pathlib import Path

from align.data.convert_helpers import chunk_units
from align.data.images import load_image
from align.data.writer import Summary, write_shards

SCORES = "scores.jsonl"


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


def score_images(
    images: dict[tuple[int, int], Path],
    prompts: list[str],
    reward,
    out: Path,
    batch_size: int,
    progress: bool,
) -> Counter:
    """Score every image (``(prompt index, seed) -> path``) not yet in ``out/scores.jsonl``;
    returns skip counts."""
    from tqdm.auto import tqdm

    path = out / SCORES
    done, skipped = read_scores(path), Counter()
    todo = [(key, images[key]) for key in sorted(images) if key not in done]
    bar = tqdm(total=len(todo), desc="scoring", unit="img", disable=not progress)
    with path.open("a") as handle:
        if path.stat().st_size and not path.read_bytes().endswith(b"\n"):
            handle.write("\n")  # after a torn line (an interrupted run), start a new one
        for start in range(0, len(todo), batch_size):
            batch, pixels = [], []
            for key, image_path in todo[start : start + batch_size]:
                image, _ = load_image(image_path)
                if image is None:
                    skipped["unreadable_image"] += 1
                    continue
                batch.append(key)
                pixels.append(image)
            if batch:
                total, parts = reward(pixels, [prompts[index] for index, _ in batch])
                for j, (index, seed) in enumerate(batch):
                    row = {
                        "prompt_index": index,
                        "seed": seed,
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
    paths, prompts, model, rows = payload
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
            "jpg_0.jpg": jpeg(paths[key(first)]),
            "jpg_1.jpg": jpeg(paths[key(second)]),
            "json": meta,
        }


def convert_singles(payload: tuple, need):
    paths, prompts, model, rows = payload
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
        yield {"jpg": jpeg(paths[key(row)]), "json": meta}


def uid(row: dict) -> str:
    return f"{row['prompt_index']:05d}_{row['seed']}"


def key(row: dict) -> tuple[int, int]:
    return row["prompt_index"], row["seed"]


def plan(
    out: Path, mode: str, min_margin: float, kto: float | None, skipped: Counter
) -> tuple[list, list | None, Counter, Counter]:
    """(pairs, singles or None, the pairs' skip counts, the singles' skip counts) of the scores in
    ``out``."""
    groups = group_scores(read_scores(out / SCORES), skipped)
    pair_skips, single_skips = Counter(skipped), Counter(skipped)
    pairs = plan_pairs(groups, mode, min_margin, pair_skips)
    singles = None if kto is None else plan_singles(groups, kto, single_skips)
    return pairs, singles, pair_skips, single_skips


def write_planned(
    folder: Path,
    kind: str,
    rows: list,
    context: tuple,
    source: dict,
    skipped: Counter,
    shard_size: int = 1000,
    workers: int = 1,
    progress: bool = True,
) -> Summary:
    """Write planned ``pairs`` or ``singles`` (``context``: paths, prompts, model name) as shards
    of their schema into ``folder`` (resumable; another source is refused)."""
    convert = {"pairs": convert_pairs, "singles": convert_singles}[kind]
    units = chunk_units(rows, shard_size, kind, lambda chunk: (*context, chunk))
    return write_shards(
        folder,
        command=f"generate-pairs {kind}",
        prefix=kind,
        source={**source, "rows": len(rows)},
        units=units,
        convert=convert,
        shard_size=shard_size,
        workers=workers,
        progress=progress,
        pre_skipped=skipped,
    )
