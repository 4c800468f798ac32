"""Where a reward model's files come from: a local file, a local directory, or a hub repository.

Every miss raises ``RewardSourceError`` naming the file (and the places) it looked for, before any
compute. A local reward directory may carry ``align_reward.json`` (``{"options": {...}}``): loader
options that the hub layouts imply (which CLIP backbone the aesthetic head sits on, which tokenizer
ImageReward uses, the architecture of a checkpoint file). String values naming an existing path
relative to the directory are resolved against it. The tiny test models are written in the real
layouts plus such a manifest.
"""

from __future__ import annotations

import json
from pathlib import Path

from align.models.loader import is_hub_id
from align.rewards.base import RewardSourceError

MANIFEST = "align_reward.json"


def read_manifest(source: str | Path | None) -> dict:
    """Loader options from ``<dir>/align_reward.json`` (empty when there is none)."""
    if source is None:
        return {}
    path = Path(source).expanduser()
    folder = path if path.is_dir() else path.parent
    if not path.exists() or not (folder / MANIFEST).is_file():
        return {}
    options = json.loads((folder / MANIFEST).read_text()).get("options", {})
    return {
        k: str(folder / v)
        if isinstance(v, str) and not v.startswith("/") and (folder / v).exists()
        else v
        for k, v in options.items()
    }


def resolve_file(
    reward: str,
    source: str | None,
    filename: str,
    default_repo: str | None,
    where_to_get: str = "",
) -> Path:
    """The path of ``filename`` for ``reward``: ``source`` is that file itself, a directory holding
    it, or a hub repository id (downloaded through the hub cache; offline this fails with the file
    named)."""
    source = source or default_repo
    if source is None:
        raise RewardSourceError(
            f"reward {reward!r} needs its checkpoint file {filename}: pass its path (or a "
            f"directory holding it){'; ' + where_to_get if where_to_get else ''}"
        )
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        if (path / filename).is_file():
            return path / filename
        raise RewardSourceError(
            f"reward {reward!r}: no {filename} in {path} (looked for {path / filename})"
        )
    if not is_hub_id(source):
        raise RewardSourceError(
            f"reward {reward!r}: {source} does not exist (looked for the file {path}, "
            f"or a directory holding {filename})"
        )
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(source, filename))
    except Exception as err:  # offline, missing file, gated repository
        raise RewardSourceError(
            f"reward {reward!r}: could not get {filename} from hub repository {source!r} "
            f"({filename}: {type(err).__name__}); download it and pass its local path"
        ) from err


def resolve_pretrained(
    reward: str, source: str | None, default_repo: str, needs: str = "config.json"
) -> str:
    """A ``from_pretrained`` location: an existing local directory
    (which must hold ``needs``) or a hub id."""
    source = source or default_repo
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / needs).is_file():
            raise RewardSourceError(
                f"reward {reward!r}: no {needs} in {path} (looked for {path / needs})"
            )
        return str(path)
    if not is_hub_id(source):
        raise RewardSourceError(
            f"reward {reward!r}: no such directory {path} (looked for {path / needs})"
        )
    return source


def load_error(reward: str, source: str, err: Exception) -> RewardSourceError:
    """Wrap a ``from_pretrained`` failure (typically: offline and not cached) so the message names
    the source."""
    return RewardSourceError(
        f"reward {reward!r}: could not load {source!r} ({type(err).__name__}: {err}); "
        "pass a local directory in the same layout"
    )
