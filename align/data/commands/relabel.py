"""Re-label preference pairs by a reward model (AI feedback), keeping the human labels alongside.

Usage::

    align data relabel --reward pickscore --src SHARDS --out DIR [--reward-source PATH_OR_HUB_ID]
                       [--batch-size 16] [--device auto] [--overwrite]

``SHARDS``: a directory of ``.tar`` pair shards, one shard, a glob or a brace pattern
(``pairs-{000000..000009}.tar``). Every pair (schema in ``align.data.schema``: ``jpg_0.jpg``,
``jpg_1.jpg``, ``json``) is scored by the reward against its caption; the json's ``label_0`` /
``label_1`` become the reward's preference (1/0, or 0.5/0.5 on an exact tie), the human labels move
to ``human_label_0`` / ``human_label_1`` (kept from the first relabelling if the shard was
relabelled before), and ``ai_feedback`` records the reward, its source and both scores. Every other
member is copied byte for byte, so DPO and KTO read the output shards unchanged. Output shards keep
their names under ``--out``. Pairs that cannot be used (bad json, a missing or unreadable image) are
skipped, counted by reason and reported.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
from collections import Counter
from pathlib import Path

from align.data.convert_helpers import command_parser, fail
from align.data.schema import PAIR_IMAGE_KEYS, pair_meta_problem
from align.data.tars import iter_tar_groups, read_member


def relabel_meta(
    meta: dict, score_0: float, score_1: float, reward: str, source: str | None
) -> dict:
    """The pair json with the reward's preference as label and the human label kept alongside."""
    out = dict(meta)
    if "human_label_0" not in out:  # relabelling a relabelled shard keeps the original human label
        out["human_label_0"], out["human_label_1"] = meta["label_0"], meta["label_1"]
    out["label_0"] = 1.0 if score_0 > score_1 else 0.0 if score_1 > score_0 else 0.5
    out["label_1"] = 1.0 - out["label_0"]
    out["ai_feedback"] = {
        "reward": reward,
        "source": source,
        "score_0": float(score_0),
        "score_1": float(score_1),
    }
    return out


def _add(tar: tarfile.TarFile, info: tarfile.TarInfo, data: bytes) -> None:
    new = tarfile.TarInfo(info.name)
    new.size, new.mtime, new.mode = len(data), info.mtime, info.mode
    new.uname, new.gname = info.uname, info.gname
    tar.addfile(new, io.BytesIO(data))


def _prepare(fields: dict[str, bytes]) -> tuple[dict | None, list | None, str | None]:
    """(meta, [image_0, image_1], None) for a usable pair, else (None, None, reason)."""
    from PIL import Image

    if "json" not in fields:
        return None, None, "missing_json"
    try:
        meta = json.loads(fields["json"])
    except (ValueError, UnicodeDecodeError):
        return None, None, "bad_json"
    problem = pair_meta_problem(meta)
    if problem:
        return None, None, problem
    images = []
    for field in PAIR_IMAGE_KEYS:
        if field not in fields:
            return None, None, f"missing_{field}"
        try:
            with Image.open(io.BytesIO(fields[field])) as im:
                im.load()
                images.append(im.convert("RGB"))
        except Exception:
            return None, None, "unreadable_image"
    return meta, images, None


def relabel_shard(
    src: Path,
    dst: Path,
    reward,
    reward_name: str,
    source: str | None,
    batch_size: int,
    counts: Counter,
    progress=None,
) -> None:
    tmp = dst.with_name(dst.name + ".partial")
    with tarfile.open(tmp, "w") as tout:
        pending = []  # (members {field: TarInfo}, their bytes {field: bytes}, meta, images)

        def flush():
            if not pending:
                return
            images = [im for *_, ims in pending for im in ims]
            captions = [meta["caption"] for _, _, meta, _ in pending for _ in range(2)]
            scores = reward.score(images, captions, batch_size=2 * batch_size).cpu().tolist()
            for j, (members, fields, meta, _) in enumerate(pending):
                new_meta = relabel_meta(meta, scores[2 * j], scores[2 * j + 1], reward_name, source)
                agree = new_meta["label_0"] == float(meta.get("human_label_0", meta["label_0"]))
                counts["agree_with_human" if agree else "disagree_with_human"] += 1
                fields["json"] = json.dumps(new_meta, ensure_ascii=False).encode("utf-8")
                for field, info in members.items():
                    _add(tout, info, fields[field])
                counts["relabelled"] += 1
            if progress is not None:
                progress.update(len(pending))
            pending.clear()

        for key, members, tar in iter_tar_groups(str(src)):
            fields = {field: read_member(tar, info) for field, info in members.items()}
            meta, images, problem = _prepare(fields)
            if problem:
                counts[f"skipped_{problem}"] += 1
                print(f"warning: {src.name}: skipping sample {key!r} ({problem})", file=sys.stderr)
                continue
            pending.append((members, fields, meta, images))
            if len(pending) == batch_size:
                flush()
        flush()
    tmp.replace(dst)


def build_parser() -> argparse.ArgumentParser:
    p = command_parser("relabel", __doc__)
    add = p.add_argument
    add(
        "--reward", required=True, help="reward name (pickscore, hps, clip, aesthetic, imagereward)"
    )
    add("--reward-source", default=None, help="local path or hub id of the reward's weights")
    add("--src", required=True, help="pair shards: directory, .tar, glob or brace pattern")
    add("--out", required=True, help="output directory (same shard names)")
    add("--batch-size", type=int, default=16, help="pairs scored per batch")
    add("--device", default="auto")
    add("--overwrite", action="store_true", help="replace output shards that already exist")
    add("--no-progress", action="store_true")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from tqdm.auto import tqdm

    from align.data.pipeline import expand_shards
    from align.eval.sampling import resolve_device
    from align.rewards import RewardSourceError, build_reward, canonical_name

    prog = "align data relabel"
    try:
        shards = [Path(s) for s in expand_shards(args.src)]
    except FileNotFoundError as err:
        return fail(str(err), prog)
    out = Path(args.out).expanduser()
    if any(s.resolve().parent == out.resolve() for s in shards):
        return fail("--out must differ from the shards' directory", prog)
    existing = [out / s.name for s in shards if (out / s.name).exists()]
    if existing and not args.overwrite:
        return fail(
            f"{len(existing)} output shards exist (e.g. {existing[0]}); pass --overwrite", prog
        )
    try:
        name = canonical_name(args.reward)
        reward = build_reward(name, args.reward_source, device=resolve_device(args.device))
    except (ValueError, RewardSourceError) as err:
        return fail(str(err), prog)
    out.mkdir(parents=True, exist_ok=True)
    counts: Counter = Counter()
    bar = tqdm(desc=f"relabel ({name})", unit="pair", disable=args.no_progress)
    for shard in shards:
        relabel_shard(
            shard, out / shard.name, reward, name, args.reward_source, args.batch_size, counts, bar
        )
    bar.close()
    summary = {"shards": len(shards), **dict(sorted(counts.items()))}
    (out / "relabel_summary.json").write_text(
        json.dumps(
            {"reward": name, "source": args.reward_source, "src": args.src, **summary}, indent=2
        )
    )
    print(json.dumps(summary))
    return 0 if counts["relabelled"] else 1
