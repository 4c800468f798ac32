"""Label each image of Pick-a-Pic pair shards desirable/undesirable (Diffusion-KTO) into
single-image shards.

Usage: align data kto-labels --src <pair shards: paths, globs, brace patterns or folders...>
       --out <dir> [--policy preferred-once|always-won|drop-contested] [--shard-size 2000]
       [--workers N]

An image is identified by its uid (``image_0_uid`` / ``image_1_uid``; when absent, ``sha1-<hex>`` of
its JPEG bytes). Pass 1 reads only the json members and counts, per uid, wins (label 1), losses
(label 0) and ties (label 0.5; a tie counts as neither a win nor a loss). Pass 2 writes each image
once, from its first occurrence that has image bytes, with the caption of that pair. Policies:

* ``preferred-once`` (default, the Diffusion-KTO paper): desirable iff it won at least once.
* ``always-won``: desirable iff it won at least once and never lost; else undesirable.
* ``drop-contested``: images that both won and lost are dropped; the rest: desirable iff they won.

So an image seen only in ties is undesirable under every policy (it was never preferred). Output:
the single-image schema (``jpg``, ``json`` with caption, label (bool), image_uid, wins, losses,
ties, model). Summary rows are image slots (two per pair): each is written, a ``repeat`` of an image
written from another slot, or skipped with a reason (``contested``, ``unresolved_image`` when no
slot of that uid has image bytes, or the pair's schema problem). Memory holds per-uid counts only,
never images.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from collections import Counter

from align.data.convert_helpers import (
    add_writer_args,
    command_parser,
    fail,
    map_in_processes,
    write_from_args,
)
from align.data.schema import PAIR_IMAGE_KEYS, pair_meta_problem
from align.data.tars import expand_shard_paths, iter_tar_groups, read_member
from align.data.writer import Skip, Unit, file_identity

POLICIES = ("preferred-once", "always-won", "drop-contested")
UID_KEYS = ("image_0_uid", "image_1_uid")
MODEL_KEYS = ("model_0", "model_1")


def decide(wins: int, losses: int, policy: str) -> bool | None:
    """An image's label under ``policy``: True desirable, False undesirable, None dropped."""
    if policy == "preferred-once":
        return wins >= 1
    if policy == "always-won":
        return wins >= 1 and losses == 0
    if policy == "drop-contested":
        return None if wins and losses else wins >= 1
    raise ValueError(f"unknown policy {policy!r}; known: {', '.join(POLICIES)}")


def _meta(tar: tarfile.TarFile, group: dict) -> tuple[dict | None, str | None]:
    if "json" not in group:
        return None, "missing_json"
    try:
        meta = json.loads(read_member(tar, group["json"]))
    except (ValueError, UnicodeDecodeError):
        return None, "bad_json"
    return meta, pair_meta_problem(meta)


def _uid(meta: dict, side: int, tar: tarfile.TarFile, member: tarfile.TarInfo | None) -> str | None:
    uid = meta.get(UID_KEYS[side])
    if uid not in (None, ""):
        return str(uid)
    if member is None or member.size == 0:
        return None
    return "sha1-" + hashlib.sha1(read_member(tar, member)).hexdigest()


def index_shard(path: str) -> tuple[list, str | None]:
    """Pass 1 over one shard: per sample (ordinal, key, problem, labels, uids, has-bytes flags),
    reading images only to hash a missing uid; and the read error of a damaged tar, or None."""
    entries = []
    try:
        for ordinal, (key, group, tar) in enumerate(iter_tar_groups(path)):
            meta, problem = _meta(tar, group)
            if problem:
                entries.append((ordinal, key, problem, None, None, None))
                continue
            members = [group.get(k) for k in PAIR_IMAGE_KEYS]
            uids = tuple(_uid(meta, side, tar, members[side]) for side in (0, 1))
            has = tuple(m is not None and m.size > 0 for m in members)
            entries.append(
                (ordinal, key, None, (float(meta["label_0"]), float(meta["label_1"])), uids, has)
            )
    except (tarfile.TarError, OSError, EOFError) as exn:
        return entries, f"{type(exn).__name__}: {exn}"
    return entries, None


def build_plan(paths: list[str], policy: str, workers: int, progress: bool):
    """Both passes' bookkeeping: per-shard emit lists, slot skip counts, label statistics."""
    from tqdm import tqdm

    # uid -> [wins, losses, ties, slots, first (shard, ordinal, side, key) | None]
    counts: dict[str, list] = {}
    slot_skips: Counter = Counter()
    read_errors: dict[str, list] = {}
    pairs = ties = 0
    results = tqdm(
        map_in_processes(index_shard, paths, workers),
        total=len(paths),
        unit="shard",
        desc="kto-labels: counting",
        disable=not progress,
    )
    for shard, (entries, error) in enumerate(results):
        if error:
            read_errors.setdefault("damaged_tar", []).append(
                f"{os.path.basename(paths[shard])}: {error}"
            )
        for ordinal, key, problem, labels, uids, has in entries:
            if problem:
                slot_skips[problem] += 2
                continue
            pairs += 1
            ties += labels[0] == 0.5
            for side in (0, 1):
                uid = uids[side]
                if uid is None:
                    slot_skips["unresolved_image"] += 1
                    continue
                entry = counts.setdefault(uid, [0, 0, 0, 0, None])
                label = labels[side]
                entry[0 if label == 1.0 else 1 if label == 0.0 else 2] += 1
                entry[3] += 1
                if entry[4] is None and has[side]:
                    entry[4] = (shard, ordinal, side, key)

    emit: dict[int, list] = {}
    images: Counter = Counter()
    for uid, (wins, losses, n_ties, slots, first) in counts.items():
        label = decide(wins, losses, policy)
        if first is None:
            images["unresolved"] += 1
            slot_skips["unresolved_image"] += slots
        elif label is None:
            images["contested_dropped"] += 1
            slot_skips["contested"] += slots
        else:
            images["desirable" if label else "undesirable"] += 1
            slot_skips["repeat"] += slots - 1
            shard, ordinal, side, key = first
            emit.setdefault(shard, []).append(
                (ordinal, side, key, uid, label, wins, losses, n_ties)
            )
    for entries in emit.values():
        entries.sort()
    stats = {"images": dict(sorted(images.items())), "pairs": pairs, "tie_pairs": ties}
    stats["policy"] = policy
    return emit, slot_skips, stats, read_errors


def convert_shard(payload: tuple, need):
    """Writer converter: the images first seen in one input shard, in tar order."""
    path, entries = payload
    position = 0
    for ordinal, (key, group, tar) in enumerate(iter_tar_groups(path)):
        while position < len(entries) and entries[position][0] == ordinal:
            _, side, expected_key, uid, label, wins, losses, n_ties = entries[position]
            if not need(position):
                yield None
            elif key != expected_key:
                raise RuntimeError(
                    f"{path} changed since it was indexed (sample {ordinal} is {key!r})"
                )
            else:
                member = group.get(PAIR_IMAGE_KEYS[side])
                image = read_member(tar, member) if member is not None else b""
                meta = json.loads(read_member(tar, group["json"]))
                if not image:
                    yield Skip("unresolved_image")
                else:
                    out = {
                        "caption": meta["caption"],
                        "label": bool(label),
                        "image_uid": uid,
                        "wins": wins,
                        "losses": losses,
                        "ties": n_ties,
                    }
                    if meta.get(MODEL_KEYS[side]) is not None:
                        out["model"] = meta[MODEL_KEYS[side]]
                    yield {"__key__": uid, "jpg": image, "json": out}
            position += 1
        if position == len(entries):
            return
    raise EOFError(f"{path} ended before sample {entries[position][0]}")


def main(argv: list[str]) -> int:
    parser = command_parser("kto-labels", __doc__)
    parser.add_argument("--src", nargs="+", required=True, help="pair shards (paths, globs, ...)")
    parser.add_argument("--policy", choices=POLICIES, default="preferred-once")
    add_writer_args(parser, prefix="kto", shard_size=2000)
    args = parser.parse_args(argv)

    paths, missing = expand_shard_paths(args.src)
    if missing or not paths:
        return fail(f"no shard matches {', '.join(missing or args.src)}")
    progress = not args.no_progress
    emit, slot_skips, stats, read_errors = build_plan(paths, args.policy, args.workers, progress)
    units = [
        Unit(os.path.basename(path), len(emit[i]), (path, emit[i]))
        for i, path in enumerate(paths)
        if i in emit
    ]
    source = {"inputs": [file_identity(p) for p in paths], "policy": args.policy}
    return write_from_args(
        args,
        "kto-labels",
        source=source,
        units=units,
        convert=convert_shard,
        pre_skipped=slot_skips,
        files_skipped=read_errors,
        extra=stats,
    )
