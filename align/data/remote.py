"""Shards that are not local files: http(s) URLs, ``pipe:`` commands and hub dataset repositories.

webdataset reads all of them (``webdataset.gopen``: curl for http(s), a shell for ``pipe:``). This
module turns a shard spec into the URLs webdataset opens, checks at start that they can be read,
and finds the ``manifest.json`` that the converters write beside their shards:

* ``https://host/data/pairs-{000000..000099}.tar``: brace patterns expand as for local paths; a
  server cannot be listed, so globs are refused. Every URL is checked with a HEAD request at start.
* ``pipe:aws s3 cp s3://bucket/pairs-000000.tar -``, ``pipe:gsutil cat gs://b/x.tar``: any command
  that writes the tar to stdout (braces expand). The first command of each spec is run at start
  until it gives a tar header, so a missing program or object fails before training.
* ``hf://datasets/<org>/<repo>[@revision][/<folder, file or glob>]``: the repository's ``.tar``
  files (all, those under the folder, or those matching the glob), listed with
  ``huggingface_hub`` and read from their ``resolve`` URLs over https. Public repositories only:
  the URLs carry no token (a token in a URL ends up in logs); download a private one first.

Manifests: a shard's ``manifest.json`` is looked up where the shard is: ``<base URL>/manifest.json``
for http(s) and hub shards, and for a ``pipe:`` command the same command with its ``.tar`` argument
replaced by ``manifest.json`` beside it (``aws s3 cp s3://b/manifest.json -``). See
``align.data.epochs.shard_sizes`` for what happens when there is none.

Problems found at start raise ``RemoteShardError``, a ``FileNotFoundError``, so ``align fit`` prints
them in one line. A shard that dies mid-stream is webdataset's to report to the data module's skip
handler (counted as ``unreadable_shard``), not this module's.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import re
import shlex
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

from braceexpand import braceexpand

log = logging.getLogger(__name__)

# the shard writer's (align.data.writer), named here without importing the writer
MANIFEST = "manifest.json"
HUB_PREFIX = "hf://"
PIPE_PREFIX = "pipe:"
HTTP_PREFIXES = ("http://", "https://")
TIMEOUT_S = 30
CHECK_THREADS = 16
TAR_HEADER_BYTES = 512
# how to read a scheme webdataset has no reader for here, suggested in the error
PIPE_COMMANDS = {"s3": "aws s3 cp {} -", "gs": "gsutil cat {}"}
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class RemoteShardError(FileNotFoundError):
    """Remote shards that cannot be read, named with what to fix. A ``FileNotFoundError`` so that
    the CLI reports it in one line at start, as it does a missing local path."""


def is_remote(spec: str) -> bool:
    """Whether ``spec`` names shards by URL or command rather than a local path (any
    ``scheme://``, so that an unsupported one is refused by name rather than "not found")."""
    spec = str(spec)
    return spec.startswith(PIPE_PREFIX) or bool(_SCHEME.match(spec))


def expand_remote(spec: str) -> list[str]:
    """The shard URLs that ``spec`` names (brace patterns expanded, hub repositories listed), each
    checked at start as the module doc says; ``RemoteShardError`` names what cannot be read."""
    urls: list[str] = []
    listings: dict[tuple[str, str], list[str]] = {}  # one listing per repository and revision
    for pattern in braceexpand(str(spec)):
        if pattern.startswith(HUB_PREFIX):
            urls.extend(_hub_shard_urls(pattern, listings))
        elif pattern.startswith(HTTP_PREFIXES):
            if "*" in urllib.parse.urlsplit(pattern).path:
                raise RemoteShardError(
                    f"{pattern}: a web server cannot be listed, so globs do not work in URLs: "
                    "name the shards with a brace pattern (pairs-{000000..000099}.tar)"
                )
            urls.append(pattern)
        elif pattern.startswith(PIPE_PREFIX):
            urls.append(pattern)
        else:
            scheme = pattern.split("://", 1)[0]
            command = PIPE_COMMANDS.get(scheme, "<a command writing {} to stdout>").format(pattern)
            raise RemoteShardError(
                f"{pattern}: {scheme}:// shards are read through a command that writes the tar to "
                f"stdout: 'pipe:{command}' (or use an https:// URL or a local path)"
            )
    urls = list(dict.fromkeys(urls))
    _check_readable(spec, urls)
    return urls


# ---- hub repositories ----------------------------------------------------------------------------
def _parse_hub_spec(spec: str) -> tuple[str, str, str]:
    """``hf://datasets/<org>/<repo>[@rev][/<path>]`` -> (repo id, revision, path in the repo)."""
    parts = spec[len(HUB_PREFIX) :].strip("/").split("/")
    if len(parts) < 3 or parts[0] != "datasets":
        raise RemoteShardError(
            f"{spec}: name a hub dataset repository as hf://datasets/<org>/<repo>, optionally "
            "followed by /<folder>, /<file.tar> or /<glob>"
        )
    name, _, revision = parts[2].partition("@")
    return f"{parts[1]}/{name}", revision or "main", "/".join(parts[3:])


def _list_hub_tars(spec: str, repo: str, revision: str) -> list[str]:
    # imported here: only hub specs need it, and it is slow to import
    from huggingface_hub import HfApi, constants

    try:
        files = HfApi().list_repo_files(repo, repo_type="dataset", revision=revision)
    except Exception as err:  # the hub client's errors differ by version and transport
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
        offline = (
            " HF_HUB_OFFLINE is set (`align plan` sets it unless you do): run with "
            "HF_HUB_OFFLINE=0 to list the repository."
            if constants.HF_HUB_OFFLINE
            else ""
        )
        raise RemoteShardError(
            f"{spec}: cannot list hub dataset repository {repo!r} at revision {revision!r} "
            f"({type(err).__name__}: {first_line}). Check the repository name and revision, the "
            f"network, and for a private repository your HF token.{offline}"
        ) from err
    return sorted(f for f in files if f.endswith(".tar"))


def _hub_shard_urls(spec: str, listings: dict[tuple[str, str], list[str]]) -> list[str]:
    from huggingface_hub import hf_hub_url

    repo, revision, path = _parse_hub_spec(spec)
    if (repo, revision) not in listings:
        listings[repo, revision] = _list_hub_tars(spec, repo, revision)
    tars = listings[repo, revision]
    if not tars:
        raise RemoteShardError(
            f"{spec}: hub dataset repository {repo!r} (revision {revision!r}) holds no .tar "
            "file: point at a repository of webdataset shards, or download the data and convert "
            "it with an `align data` command (data/README.md)"
        )
    if not path:
        chosen = tars
    elif any(ch in path for ch in "*?["):
        chosen = [f for f in tars if fnmatch.fnmatchcase(f, path)]
    elif path.endswith(".tar"):
        chosen = [f for f in tars if f == path]
    else:
        chosen = [f for f in tars if f.startswith(path.rstrip("/") + "/")]
    if not chosen:
        shown = ", ".join(tars[:5]) + (", ..." if len(tars) > 5 else "")
        raise RemoteShardError(
            f"{spec}: no .tar file of hub dataset repository {repo!r} matches {path!r}; its "
            f"{len(tars)} .tar file(s): {shown}"
        )
    return [hf_hub_url(repo, f, repo_type="dataset", revision=revision) for f in chosen]


# ---- start-up checks -----------------------------------------------------------------------------
def _http_problem(url: str) -> str | None:
    """Why ``url`` cannot be read (None: it can), from a HEAD request."""
    request = urllib.request.Request(url, method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S):
            return None
    except urllib.error.HTTPError as err:
        if err.code == 405:  # the server refuses HEAD, not the file: the stream will tell
            return None
        if err.code in (401, 403):
            return (
                f"HTTP {err.code}: access refused (a private or gated hub repository: download it "
                "and point at the folder)"
            )
        if err.code in (404, 410):
            return f"HTTP {err.code}: no such file (check the URL and the brace range)"
        return f"HTTP {err.code} {err.reason}"
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        return f"cannot connect ({reason}): is the server up and the address right?"


def _pipe_problem(url: str) -> str | None:
    """Why the command of a ``pipe:`` URL gives no tar (None: it gives at least a tar header)."""
    command = url[len(PIPE_PREFIX) :]
    try:
        program = shlex.split(command)[0]
    except (ValueError, IndexError):
        return "not a command"
    if "=" not in program and shutil.which(program) is None:  # VAR=value cmd: let the shell run it
        return f"{program!r} is not installed (not on PATH)"
    try:
        # head stops the command after one tar header: nothing more is downloaded
        done = subprocess.run(
            ["sh", "-c", f"{command} | head -c {TAR_HEADER_BYTES}"],
            capture_output=True,
            timeout=2 * TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        return f"no data within {2 * TIMEOUT_S} s"
    if len(done.stdout) >= TAR_HEADER_BYTES:
        return None
    error = done.stderr.decode(errors="replace").strip().splitlines()
    return f"gave {len(done.stdout)} bytes" + (f": {error[-1]}" if error else "")


def _check_readable(spec: str, urls: list[str]) -> None:
    """Every http(s) URL of an explicit spec, the first hub file (access) and the first command of
    a ``pipe:`` spec; ``RemoteShardError`` lists the failures."""
    if spec.startswith(HUB_PREFIX):
        checked = urls[:1]  # the listing says the files exist; one request checks access
    else:
        web = [u for u in urls if u.startswith(HTTP_PREFIXES)]
        pipes = [u for u in urls if u.startswith(PIPE_PREFIX)]
        checked = web + pipes[:1]  # each command may download: run one
    if not checked:
        return

    def problem(url: str) -> str | None:
        return _pipe_problem(url) if url.startswith(PIPE_PREFIX) else _http_problem(url)

    with ThreadPoolExecutor(min(CHECK_THREADS, len(checked))) as pool:
        failed = [(u, p) for u, p in zip(checked, pool.map(problem, checked)) if p]
    if failed:
        shown = "; ".join(f"{u}: {p}" for u, p in failed[:5]) + ("; ..." if len(failed) > 5 else "")
        raise RemoteShardError(
            f"{len(failed)} of {len(urls)} shard(s) named by {spec!r} cannot be read: {shown}"
        )


# ---- reading -------------------------------------------------------------------------------------
def open_remote(url: str) -> BinaryIO:
    """A stream of the shard's bytes, opened as the data modules open it (webdataset's gopen)."""
    from webdataset.gopen import gopen  # imports torch: only when a remote shard is read

    return gopen(url, "rb")


def manifest_location(url: str) -> tuple[str, str] | None:
    """(where the manifest beside remote shard ``url`` is, the shard's name in it), or None when a
    ``pipe:`` command names no single ``.tar`` to put it beside."""
    if url.startswith(HTTP_PREFIXES):
        parts = urllib.parse.urlsplit(url)
        folder, _, name = parts.path.rpartition("/")
        where = urllib.parse.urlunsplit(parts._replace(path=f"{folder}/{MANIFEST}", query=""))
        return where, urllib.parse.unquote(name)
    if url.startswith(PIPE_PREFIX):
        command = url[len(PIPE_PREFIX) :]
        try:
            words = shlex.split(command)
        except ValueError:
            return None
        tars = [w for w in words if w.split("?")[0].endswith(".tar")]
        if len(tars) != 1 or command.count(tars[0]) != 1:
            return None
        shard = tars[0].split("?")[0]
        folder, _, name = shard.rpartition("/")
        beside = f"{folder}/{MANIFEST}" if folder else MANIFEST
        return PIPE_PREFIX + command.replace(tars[0], beside), name
    return None


def local_manifest(folder: Path) -> dict | None:
    """The ``manifest.json`` in local ``folder`` (None when absent, unreadable or not an object)."""
    try:
        data = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def fetch_manifest(where: str) -> dict | None:
    """The manifest at ``where`` (from ``manifest_location``); None when there is none or it is not
    a manifest. An http error other than "not found" is logged, and the caller falls back as it
    does for none."""
    try:
        if where.startswith(PIPE_PREFIX):
            done = subprocess.run(
                where[len(PIPE_PREFIX) :],
                shell=True,  # a pipe: URL is a shell command, as webdataset runs it
                capture_output=True,
                timeout=4 * TIMEOUT_S,
            )
            if done.returncode != 0:
                return None
            data = done.stdout
        else:
            with urllib.request.urlopen(where, timeout=TIMEOUT_S) as response:
                data = response.read()
    except urllib.error.HTTPError as err:
        if err.code not in (403, 404, 410):  # S3-style servers answer 403 for a missing key
            log.warning("could not fetch %s (HTTP %d %s)", where, err.code, err.reason)
        return None
    except (urllib.error.URLError, OSError, subprocess.TimeoutExpired) as err:
        log.warning("could not fetch %s (%s)", where, err)
        return None
    try:
        manifest = json.loads(data)
    except ValueError:
        return None
    return manifest if isinstance(manifest, dict) else None


def manifest_sizes(where: str) -> dict[str, int]:
    """Shard name -> samples from the manifest at ``where`` (empty when there is none)."""
    shards = (fetch_manifest(where) or {}).get("shards")
    if not isinstance(shards, dict):
        return {}
    return {
        name: int(record["samples"])
        for name, record in shards.items()
        if isinstance(record, dict) and isinstance(record.get("samples"), int)
    }


def describe(urls: list[str]) -> str:
    """A short name for a list of shard URLs in messages."""
    return urls[0] + (f" and {len(urls) - 1} more" if len(urls) > 1 else "")
