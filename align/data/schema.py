"""The shard schemas every converter writes and every data module reads (webdataset tar members).

A sample is the group of tar members sharing a key;
the member name after the key's first dot is its field.

* Pair shards (Pick-a-Pic, and AI-relabelled copies): ``jpg_0.jpg``, ``jpg_1.jpg``, ``json`` with at
  least ``caption``, ``label_0``, ``label_1`` (each in {0, 0.5, 1}); the Pick-a-Pic uids and model
  names ride along when present (``image_0_uid``, ``image_1_uid``, ``model_0``, ``model_1``,
  ``ranking_id``, ``user_id``).
* Single-image shards (KTO): ``jpg``, ``json`` with ``caption``, ``label`` (true = desirable),
  ``image_uid``, ``wins``, ``losses``.
* Long-caption shards (LongAlign SFT): ``jpg``, ``txt`` (the caption), ``json`` (source metadata).
"""

from __future__ import annotations

PAIR_IMAGE_KEYS = ("jpg_0.jpg", "jpg_1.jpg")
PAIR_REQUIRED_META = ("caption", "label_0", "label_1")
PAIR_OPTIONAL_META = (
    "image_0_uid",
    "image_1_uid",
    "model_0",
    "model_1",
    "ranking_id",
    "user_id",
    "best_image_uid",
)
VALID_LABELS = (0.0, 0.5, 1.0)

SINGLE_IMAGE_KEY = "jpg"
SINGLE_REQUIRED_META = ("caption", "label", "image_uid")

LONG_CAPTION_KEYS = ("jpg", "txt")

CACHE_COMMAND = "cache-latents"  # the manifest ``command`` of a latent cache (align.data.cached)


def pair_meta_problem(meta: object) -> str | None:
    """Why a pair sample's json is unusable (a short reason used as a skip counter name),
    or None."""
    if not isinstance(meta, dict):
        return "json_not_object"
    for key in PAIR_REQUIRED_META:
        if key not in meta or meta[key] is None:
            return f"missing_{key}"
    if not isinstance(meta["caption"], str):
        return "caption_not_string"
    try:
        labels = [float(meta["label_0"]), float(meta["label_1"])]
    except (TypeError, ValueError):
        return "bad_label"
    if any(label not in VALID_LABELS for label in labels) or sum(labels) != 1.0:
        return "bad_label"
    return None


def single_meta_problem(meta: object) -> str | None:
    """Why a single-image sample's json is unusable, or None. ``label`` must be a real boolean."""
    if not isinstance(meta, dict):
        return "json_not_object"
    for key in SINGLE_REQUIRED_META:
        if key not in meta or meta[key] is None:
            return f"missing_{key}"
    if not isinstance(meta["label"], bool):
        return "label_not_boolean"
    if not isinstance(meta["caption"], str):
        return "caption_not_string"
    return None


def cache_settings(manifest: object) -> dict | None:
    """A latent cache's settings (the ``source.cache`` of a manifest written by ``align data
    cache-latents``); None for any other manifest."""
    if not isinstance(manifest, dict) or manifest.get("command") != CACHE_COMMAND:
        return None
    source = manifest.get("source")
    cache = source.get("cache") if isinstance(source, dict) else None
    return cache if isinstance(cache, dict) else None
