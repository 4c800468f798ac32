"""Score every image of a rendered set with one or more reward models.

Each image is read once and scored by every reward in batches. An unreadable image (truncated, not
an image) is reported on stderr and skipped: it gets no score and is listed in the result's
``skipped``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from align.data.images import load_image
from align.eval.layout import ImageSet
from align.eval.stats import Key


@dataclass
class ScoredSet:
    image_set: ImageSet
    # reward -> (prompt, seed) -> score
    scores: dict[str, dict[Key, float]] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)

    def rows(self, label: str) -> list[dict]:
        """One row per scored image: set label, prompt index, seed, prompt, path,
        one column per reward."""
        out = []
        for entry in self.image_set.entries:
            if not self.scores or not all(entry.key in s for s in self.scores.values()):
                continue
            row = {"set": label, "prompt_index": entry.prompt_index, "seed": entry.seed}
            row |= {"prompt": self.image_set.prompt(entry), "path": str(entry.path)}
            out.append(row | {name: s[entry.key] for name, s in self.scores.items()})
        return out


def score_columns(name: str, reward, images, prompts, batch_size: int) -> dict[str, list[float]]:
    """A reward's score columns: one (its name) for most; Denscore reports original,
    relevant and weighted."""
    if hasattr(reward, "score_columns"):
        return {
            k: v.detach().cpu().tolist()
            for k, v in reward.score_columns(images, prompts, batch_size).items()
        }
    return {name: reward.score(images, prompts, batch_size=batch_size).detach().cpu().tolist()}


def score_image_set(
    image_set: ImageSet, rewards: dict, batch_size: int = 16, progress: bool = True
) -> ScoredSet:
    """Score ``image_set`` with every reward in ``rewards`` (name -> RewardModel)."""
    from tqdm.auto import tqdm

    result = ScoredSet(image_set)
    entries = image_set.entries
    bar = tqdm(
        total=len(entries), desc=f"scoring {image_set.root.name}", unit="img", disable=not progress
    )
    for start in range(0, len(entries), batch_size):
        batch, images = [], []
        for entry in entries[start : start + batch_size]:
            image, why = load_image(entry.path)
            if image is None:
                print(f"warning: skipping unreadable image {entry.path} ({why})", file=sys.stderr)
                result.skipped.append((str(entry.path), why))
                continue
            batch.append(entry)
            images.append(image)
        if batch:
            prompts = [image_set.prompt(e) for e in batch]
            for name, reward in rewards.items():
                columns = score_columns(name, reward, images, prompts, batch_size)
                for column, values in columns.items():  # NaN: no segment
                    scores = result.scores.setdefault(column, {})
                    scores.update({e.key: float(v) for e, v in zip(batch, values) if v == v})
        bar.update(len(entries[start : start + batch_size]))
    bar.close()
    return result
