"""Reading shard tars: expanding shard specs into paths (and, where a command asks for it, remote
URLs: ``align.data.remote``), grouping members into samples as webdataset does.

Kept apart from :mod:`align.data.writer` so that the commands that only read shards (``verify``,
``kto-labels``, ``cache-latents``) and the writer's own resume check share one small reader without
the writing machinery.
"""

from __future__ import annotations

import glob
import hashlib
import os
import tarfile
from contextlib import suppress
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator

from align.data.remote import expand_remote, is_remote, open_remote

# pyarrow's errors derive from these
READ_ERRORS = (OSError, EOFError, ValueError, tarfile.TarError)


def expand_shard_paths(
    specs: Iterable[str], suffix: str = ".tar", remote: bool = False
) -> tuple[list[str], list[str]]:
    """Expand paths, globs, brace patterns (``shards-{000000..000009}.tar``) and folders (every
    ``*.tar`` in them) into (existing paths in order,
    specs that matched nothing). Duplicates are kept once.

    ``remote``: URLs, ``pipe:`` commands and hub repositories are expanded too
    (``align.data.remote.expand_remote``; one that cannot be read raises ``RemoteShardError``);
    otherwise they match nothing, for commands that need files."""
    from braceexpand import braceexpand

    found: list[str] = []
    missing: list[str] = []
    for spec in specs:
        if remote and is_remote(spec):
            found.extend(expand_remote(spec))
            continue
        for pattern in braceexpand(spec):
            if os.path.isdir(pattern):
                matches = sorted(str(p) for p in Path(pattern).rglob(f"*{suffix}") if p.is_file())
            elif glob.has_magic(pattern):
                matches = sorted(glob.glob(pattern, recursive=True))
            else:
                matches = [pattern] if os.path.isfile(pattern) else []
            if not matches:
                missing.append(pattern)
            found.extend(matches)
    return list(dict.fromkeys(found)), missing


def split_member_name(name: str) -> tuple[str, str]:
    """Tar member name -> (sample key, field), exactly as webdataset groups members."""
    from webdataset.tariterators import base_plus_ext

    key, ext = base_plus_ext(name)
    return (key or name), (ext or "")


def _grouped(tar: tarfile.TarFile, value: Callable) -> Iterator[tuple[str, dict]]:
    """(key, {field: value(member, field)}) for each run of consecutive members sharing a key (a
    new sample also starts when a field repeats), as webdataset groups them. ``value`` runs as each
    member goes by: a streamed tar cannot go back to it."""
    key, group = None, {}
    for member in tar:
        if not member.isfile():
            continue
        member_key, ext = split_member_name(member.name)
        if member_key != key or ext in group:
            if key is not None:
                yield key, group
            key, group = member_key, {}
        group[ext] = value(member, ext)
    if key is not None:
        yield key, group


def iter_tar_groups(path: str) -> Iterator[tuple[str, dict[str, tarfile.TarInfo], tarfile.TarFile]]:
    """Yield (key, {field: TarInfo}, open tar) per sample (``_grouped``); read a member with
    ``tar.extractfile(info)`` (random access: only the members read are read). A damaged tar raises
    ``tarfile.TarError`` / ``OSError`` / ``EOFError`` where the damage is."""
    with tarfile.open(path, "r:*") as tar:
        for key, group in _grouped(tar, lambda member, field: member):
            yield key, group, tar


def read_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    """A member's bytes; raises EOFError when the archive ends early."""
    handle = tar.extractfile(member)
    data = handle.read() if handle else b""
    if len(data) != member.size:
        raise EOFError(f"member {member.name} truncated ({len(data)} of {member.size} bytes)")
    return data


def iter_tar_samples(
    source: str | BinaryIO, fields: Callable[[str], bool] | None = None
) -> Iterator[tuple[str, dict[str, bytes | None]]]:
    """Yield (key, {field: bytes}) per sample, reading members as they stream by (fine for
    compressed tars); fields for which ``fields(field)`` is false are listed with value None and not
    read. ``source``: a local path, a remote shard URL (``align.data.remote``) or an open binary
    stream; the last two are read once, front to back. A stream that breaks off raises where it
    does, as a damaged file would (``READ_ERRORS``)."""

    def samples(tar: tarfile.TarFile) -> Iterator[tuple[str, dict[str, bytes | None]]]:
        wanted = fields or (lambda field: True)
        return _grouped(tar, lambda m, field: read_member(tar, m) if wanted(field) else None)

    if isinstance(source, (str, os.PathLike)) and not is_remote(str(source)):
        with tarfile.open(source, "r:*") as tar:
            yield from samples(tar)
        return
    stream = open_remote(str(source)) if isinstance(source, str) else source
    finished = False
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            yield from samples(tar)
        finished = True
    finally:
        if stream is not source and finished:
            stream.close()  # raises when the download failed after the tar's last member
        elif stream is not source:  # stopped early or broke: the read error says what happened
            with suppress(OSError):
                stream.close()


class HashingStream:
    """A binary stream whose bytes read or written through it are hashed (``sha256``) and counted
    (``size``): a shard's checksum in the one pass that writes or streams it."""

    def __init__(self, stream: BinaryIO):
        self.stream, self.sha256, self.size = stream, hashlib.sha256(), 0

    def _seen(self, data: bytes) -> bytes:
        self.sha256.update(data)
        self.size += len(data)
        return data

    def read(self, size: int = -1) -> bytes:
        return self._seen(self.stream.read(size))

    def write(self, data: bytes) -> int:
        return self.stream.write(self._seen(data))

    def flush(self) -> None:
        self.stream.flush()


def sha256_file(path: str | os.PathLike) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()
