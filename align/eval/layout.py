"""The on-disk layout of a rendered image set (what ``align sample`` writes and ``align eval``
reads).

::

    <dir>/prompts.jsonl                  one line per prompt: {"index": i, "prompt": "..."}
    <dir>/meta.json                      how the set was rendered (checkpoint, scheduler, steps,
                                         guidance, size, seeds, dtype, prompt source, versions)
    <dir>/<prompt_index:05d>_<seed>.png  image of prompt ``prompt_index`` from initial-noise seed
                                         ``seed``

Two sets rendered from the same prompt set and seeds pair up image by image on (prompt_index, seed):
the same prompt and the same initial noise, only the model differs.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

PROMPTS_FILE = "prompts.jsonl"
META_FILE = "meta.json"
IMAGE_PATTERN = re.compile(r"^(\d{5,})_(-?\d+)\.png$")


class ImageSetError(ValueError):
    """A directory that is not a usable image set, or two sets that cannot be compared."""


def image_name(prompt_index: int, seed: int) -> str:
    return f"{prompt_index:05d}_{seed}.png"


def write_prompts_file(folder: Path, prompts: list[str]) -> None:
    lines = [
        json.dumps({"index": i, "prompt": p}, ensure_ascii=False) for i, p in enumerate(prompts)
    ]
    tmp = folder / (PROMPTS_FILE + ".tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(folder / PROMPTS_FILE)


def read_prompts_file(folder: Path) -> list[str]:
    path = Path(folder) / PROMPTS_FILE
    if not path.is_file():
        raise ImageSetError(
            f"{folder} is not an image set: no {PROMPTS_FILE} (render one with `align sample`)"
        )
    lines = path.read_text(encoding="utf-8").splitlines()
    rows = sorted((json.loads(line) for line in lines if line.strip()), key=lambda r: r["index"])
    if [r["index"] for r in rows] != list(range(len(rows))):
        raise ImageSetError(f"{path}: prompt indices are not 0..{len(rows) - 1}")
    return [r["prompt"] for r in rows]


def prompt_difference(
    a: list[str], b: list[str], name_a: str = "run", name_b: str = "baseline", show: int = 10
) -> str | None:
    """Why two prompt lists differ (a readable listing), or None when they are identical."""
    if a == b:
        return None
    set_a, set_b = set(a), set(b)
    only_a = [p for p in dict.fromkeys(a) if p not in set_b]
    only_b = [p for p in dict.fromkeys(b) if p not in set_a]
    lines = [f"the prompt sets differ ({len(a)} prompts in {name_a}, {len(b)} in {name_b})"]
    for label, items in ((f"only in {name_a}", only_a), (f"only in {name_b}", only_b)):
        if items:
            lines.append(f"  {label} ({len(items)}):")
            lines += [f"    - {p!r}" for p in items[:show]]
            if len(items) > show:
                lines.append(f"    ... and {len(items) - show} more")
    if not only_a and not only_b:
        moved = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
        lines.append(
            f"  same prompts in a different order or multiplicity (first differing index: "
            f"{moved[0] if moved else min(len(a), len(b))})"
        )
    return "\n".join(lines)


@dataclass
class ImageEntry:
    prompt_index: int
    seed: int
    path: Path

    @property
    def key(self) -> tuple[int, int]:
        return (self.prompt_index, self.seed)


@dataclass
class ImageSet:
    root: Path
    prompts: list[str]
    meta: dict = field(default_factory=dict)
    entries: list[ImageEntry] = field(default_factory=list)

    @property
    def seeds(self) -> list[int]:
        return sorted({e.seed for e in self.entries})

    def prompt(self, entry: ImageEntry) -> str:
        return self.prompts[entry.prompt_index]


def scan_image_set(folder: str | Path) -> ImageSet:
    """Read a rendered image set: its prompts, metadata and every ``<prompt_index>_<seed>.png``."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise ImageSetError(f"image set {root} does not exist")
    prompts = read_prompts_file(root)
    meta_path = root / META_FILE
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    entries = []
    for path in sorted(root.iterdir()):
        m = IMAGE_PATTERN.match(path.name)
        if m and path.is_file():
            index, seed = int(m.group(1)), int(m.group(2))
            if index >= len(prompts):
                raise ImageSetError(
                    f"{path}: prompt index {index} but {PROMPTS_FILE} has {len(prompts)} prompts"
                )
            entries.append(ImageEntry(index, seed, path))
    if not entries:
        raise ImageSetError(f"image set {root} has no images (<prompt_index:05d>_<seed>.png)")
    return ImageSet(root=root, prompts=prompts, meta=meta, entries=entries)
