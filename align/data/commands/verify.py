"""Check shards: read every sample, decode every image, validate the schema; exit 1 on any problem.

Usage: align data verify <shard paths, globs, brace patterns, folders, URLs or hf:// repos...>
       [--schema auto|pair|single|long|cached] [--workers N] [--report report.json] [--examples 20]

The schema (``align.data.schema``) is detected per shard from its first sample unless ``--schema``
is given. When the shard's folder has a ``manifest.json`` listing it (written by the converters),
its sha256 and sample count are checked too. Remote shards (``https://...``, ``pipe:...``,
``hf://datasets/<org>/<repo>``: ``align.data.remote``) are streamed through once, their sha256
taken on the way, against the manifest where they are. Exit status: 0 all good, 1 problems found,
2 no shards / bad arguments / remote shards that cannot be read.

Latent caches (``align data cache-latents``) are ``cached`` shards, checked by
:mod:`align.data.commands._verify_cache`.
"""

from __future__ import annotations

import functools
import io
import json
import os
import sys
import tarfile
from collections import Counter
from contextlib import suppress
from pathlib import Path

from align.data.commands._verify_cache import (
    META_PROBLEM,
    CachedShardCheck,
    detect_cached,
    parse_json,
)
from align.data.convert_helpers import command_parser, fail, map_in_processes
from align.data.images import decode_caption
from align.data.pipeline import SkipSample
from align.data.remote import (
    RemoteShardError,
    fetch_manifest,
    is_remote,
    local_manifest,
    manifest_location,
    open_remote,
)
from align.data.schema import LONG_CAPTION_KEYS, PAIR_IMAGE_KEYS, SINGLE_IMAGE_KEY, cache_settings
from align.data.tars import HashingStream, expand_shard_paths, iter_tar_samples, sha256_file
from align.data.writer import MANIFEST

CACHED = "cached"  # shards of a latent cache (align.data.cached)
# schema -> (its image members, the members every sample must have)
LAYOUTS = {
    "pair": (PAIR_IMAGE_KEYS, (*PAIR_IMAGE_KEYS, "json")),
    "single": ((SINGLE_IMAGE_KEY,), (SINGLE_IMAGE_KEY, "json")),
    "long": (("jpg",), LONG_CAPTION_KEYS),
}
SCHEMAS = tuple(LAYOUTS)


def detect_schema(fields: set[str]) -> str | None:
    if all(k in fields for k in PAIR_IMAGE_KEYS):
        return "pair"
    if "txt" in fields:
        return "long"
    if SINGLE_IMAGE_KEY in fields and "json" in fields:
        return "single"
    return None


def _decode(data: bytes | None) -> str | None:
    from PIL import Image

    if not data:
        return "empty image"
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    except Exception as exn:  # any decoder failure is the finding we report
        return f"{type(exn).__name__}: {exn}"
    return None


def caption_problem(raw: object) -> str | None:
    """Why training would skip this caption (missing, not UTF-8, blank), or None."""
    try:
        decode_caption(raw)
    except SkipSample as skip:
        return skip.reason
    return None


def sample_problems(schema: str, sample: dict[str, bytes]) -> list[tuple[str, str]]:
    """(reason, detail) for everything wrong with one sample under ``schema``."""
    images, required = LAYOUTS[schema]
    problems = [(f"missing_{key}", "member absent") for key in required if key not in sample]
    for key in images:
        error = _decode(sample[key]) if key in sample else None
        if error:
            problems.append(("corrupt_image", f"{key}: {error}"))
    if "json" in sample:
        meta, error = parse_json(sample["json"])
        if error:
            problems.append(("bad_json", error))
        elif schema in META_PROBLEM:
            problem = META_PROBLEM[schema](meta)
            if problem:
                problems.append((problem, json.dumps(meta)[:200]))
            elif reason := caption_problem(meta.get("caption")):
                problems.append((reason, ""))  # what training would skip
        elif not isinstance(meta, dict):
            problems.append(("json_not_object", str(meta)[:200]))
    if schema == "long" and "txt" in sample and (reason := caption_problem(sample["txt"])):
        problems.append((reason, ""))
    return problems


# every shard of a remote folder shares one manifest: fetched once per process
_remote_manifest = functools.lru_cache(maxsize=16)(fetch_manifest)


def _manifest_record(shard: str) -> tuple[dict | None, dict | None]:
    """(the manifest where ``shard`` is, or None; its record of the shard, or None)."""
    if not is_remote(shard):
        manifest, name = local_manifest(Path(shard).parent), Path(shard).name
    else:
        location = manifest_location(shard)
        manifest, name = (_remote_manifest(location[0]), location[1]) if location else (None, "")
    shards = (manifest or {}).get("shards")
    record = shards.get(name) if isinstance(shards, dict) else None
    return manifest, record if isinstance(record, dict) else None


def _stream_sha256(remote: HashingStream) -> str | None:
    """The sha256 of a remote shard's whole stream (what the tar reader left unread included);
    None when the stream breaks off."""
    try:
        while remote.read(1 << 20):
            pass
        remote.stream.close()  # raises when the download failed
    except OSError:
        return None
    return remote.sha256.hexdigest()


def verify_shard(path: str, schema: str = "auto", examples: int = 20) -> dict:
    """One shard's report: samples, schema, problems by reason, examples (key, reason, detail)."""
    problems: Counter = Counter()
    found: list[tuple[str, str, str]] = []
    report = {"shard": path, "samples": 0, "bad_samples": 0}
    report["schema"] = None if schema == "auto" else schema

    def note(key: str, reason: str, detail: str) -> None:
        problems[reason] += 1
        if len(found) < examples:
            found.append((key, reason, detail))

    seen: set[str] = set()
    manifest, record = _manifest_record(path)
    remote = HashingStream(open_remote(path)) if is_remote(path) else None
    intact = True
    cached: CachedShardCheck | None = None
    try:
        for key, sample in iter_tar_samples(remote or path):
            report["samples"] += 1
            if report["schema"] is None:
                fields = set(sample)
                cache = cache_settings(manifest) is not None or detect_cached(fields)
                report["schema"] = CACHED if cache else detect_schema(fields)
                if report["schema"] is None:
                    note(key, "unknown_schema", f"fields {sorted(sample)}")
                    report["schema"] = "unknown"
            if report["schema"] == CACHED and cached is None:
                cached = CachedShardCheck(Path(path), manifest, set(sample))
                report["cache_schema"] = cached.schema
                for reason, detail in cached.folder_problems:
                    note("-", reason, detail)
            issues = [("duplicate_key", "key seen earlier in the shard")] if key in seen else []
            seen.add(key)
            if report["schema"] in SCHEMAS:
                issues += sample_problems(report["schema"], sample)
            elif cached is not None:
                issues += cached.problems(key, sample)
            for reason, detail in issues:
                note(key, reason, detail)
            report["bad_samples"] += bool(issues)
    except (tarfile.TarError, OSError, EOFError) as exn:
        note("-", "corrupt_tar", f"after {report['samples']} samples: {type(exn).__name__}: {exn}")
        intact = False
    if remote is not None:
        digest = _stream_sha256(remote) if intact and record is not None else None
        with suppress(OSError):  # a broken stream: already reported as corrupt_tar
            remote.stream.close()
    else:
        digest = sha256_file(path) if record is not None else None
    if record is not None:
        if digest is not None and digest != record.get("sha256"):
            note("-", "checksum_mismatch", f"sha256 differs from {MANIFEST}")
        if record.get("samples") != report["samples"]:
            note(
                "-",
                "sample_count_mismatch",
                f"{report['samples']} samples, {MANIFEST} says {record.get('samples')}",
            )
    report["problems"] = dict(problems)
    report["examples"] = found
    report["empty"] = report["samples"] == 0
    return report


def print_reports(reports: list[dict]) -> tuple[int, int, Counter]:
    """Print each shard's problems and the totals; (samples, bad samples, problems by reason)."""
    totals: Counter = Counter()
    for report in reports:
        totals.update(report["problems"])
        if report["problems"]:
            print(
                f"{report['shard']}: {report['samples']} samples, {report['bad_samples']} bad, "
                f"problems {report['problems']}"
            )
            for key, reason, detail in report["examples"]:
                print(f"  {key}: {reason}: {detail}")
    schemas = dict(Counter(r["schema"] for r in reports))
    samples = sum(r["samples"] for r in reports)
    bad = sum(r["bad_samples"] for r in reports)
    bad_shards = sum(bool(r["problems"]) for r in reports)
    empty = sum(r["empty"] for r in reports)
    print(
        f"verified {len(reports)} shards ({schemas}): {samples} samples, {bad} bad samples, "
        f"{bad_shards} shards with problems" + (f", {empty} empty shards" if empty else "")
    )
    for reason, n in sorted(totals.items()):
        print(f"  {reason}: {n}")
    return samples, bad, totals


def main(argv: list[str]) -> int:
    parser = command_parser("verify", __doc__)
    parser.add_argument(
        "shards",
        nargs="+",
        help="shard paths, globs, brace patterns or folders; https:// URLs, pipe: commands, "
        "hf://datasets/<org>/<repo>",
    )
    parser.add_argument(
        "--schema",
        choices=("auto", *SCHEMAS, CACHED),
        default="auto",
        help="auto (per shard), or check every shard as this schema (cached: a latent cache)",
    )
    parser.add_argument("--workers", type=int, default=max(1, min(8, os.cpu_count() or 1)))
    parser.add_argument("--examples", type=int, default=20, help="problem examples per shard")
    parser.add_argument("--report", help="also write the full report as JSON here")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    from tqdm import tqdm

    try:
        paths, missing = expand_shard_paths(args.shards, remote=True)
    except RemoteShardError as err:
        return fail(str(err))
    for spec in missing:
        print(f"error: no shard matches {spec}", file=sys.stderr)
    if not paths:
        return fail("no shards to verify")
    verify = functools.partial(verify_shard, schema=args.schema, examples=args.examples)
    reports = list(
        tqdm(
            map_in_processes(verify, paths, args.workers),
            total=len(paths),
            unit="shard",
            desc="verify",
            disable=args.no_progress,
        )
    )
    samples, bad, totals = print_reports(reports)
    if args.report:
        with open(args.report, "w", encoding="utf-8") as handle:
            found = dict(samples=samples, bad_samples=bad, problems=dict(totals), missing=missing)
            json.dump({"shards": reports, **found}, handle, indent=1)
    return 1 if totals or missing else 0
