"""Training a segment-level preference model (Denscore) as a LightningModule.

Not a ``DiffusionModule``: it fine-tunes a transformers ``CLIPModel`` (both towers and the logit
scale) on preference pairs whose captions are long, with
``align.objectives.preference.preference_loss``: PickScore's objective (softmax over the pair's two
scores against the human label, ties as 0.5 / 0.5) applied to LongAlign's segment-aggregated scores,
plus an optional per-segment term (``segment_weight``).

Scores are computed by the same code the reward registry scores with
(``align.rewards.denscore.Denscore`` over the CLIP being trained, ``align.rewards.segments``): the
model trains on exactly the score it is later used with. Export (``export(dir)``, called by
``align.callbacks.DiffusersExport``): the CLIPModel, its tokenizer, the image processor config and
the common text direction of recent training captions,
which ``build_reward("denscore", dir)`` loads as is.
"""

from __future__ import annotations

import collections
import logging
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from align.modules.trainable import TrainableModule
from align.objectives.preference import preference_loss
from align.objectives.reward import DegenerateDirection, segment_cosines, segment_score
from align.rewards.denscore import Denscore, write_denscore_export
from align.rewards.hf_clip import HFClip, crop_size
from align.rewards.segments import embed_prompt_segments, estimate_direction
from align.rewards.tiny import write_tiny_hf_clip

log = logging.getLogger(__name__)

TINY = "tiny-clip"
MAX_LOGIT_SCALE = 100.0  # CLIP clamps exp(logit_scale) at 100


def load_clip(source: str, seed: int = 0):
    """(CLIPModel, tokenizer, image processor) from a local directory or hub id, or ``tiny-clip``:
    the tiny random CLIP of ``align.rewards.tiny`` (written to a temporary directory and loaded
    through the same path)."""
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    if source == TINY:
        with tempfile.TemporaryDirectory() as tmp:
            write_tiny_hf_clip(tmp, seed=seed)
            return load_clip(tmp)
    path = Path(source).expanduser()
    if source.startswith((".", "/", "~")) and not path.is_dir():
        raise FileNotFoundError(f"preference model {source!r}: no such directory")
    where = str(path) if path.is_dir() else source
    try:
        model = CLIPModel.from_pretrained(where)
        tokenizer = AutoTokenizer.from_pretrained(where)
        processor = AutoImageProcessor.from_pretrained(where, backend="pil")
    except OSError as err:
        raise FileNotFoundError(f"preference model {source!r}: could not load it ({err})") from err
    return model, tokenizer, processor


class PreferenceModelModule(TrainableModule):
    """Fine-tunes a CLIPModel into a segment-level preference model.

    Args:
        model: ``tiny-clip``, a local CLIPModel directory (with tokenizer and
            ``preprocessor_config.json``) or a hub id (``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` for
            the paper's CLIP-H).
        splitter: how captions are split into segments (``official``, ``sentences``, ``packed``).
        segment_weight: weight of the per-segment term (0: the pair term alone).
        logit_scale: None trains CLIP's own logit scale (exp, clamped at 100, as PickScore);
            a number fixes it.
        gradient_checkpointing: recompute both towers' activations in backward
            (CLIP-H at batch > 8).
        direction_captions: how many recent training captions the export's common direction is
            estimated over.
        optimizer / lr_scheduler: injected by LightningCLI.
    """

    prog_bar_metrics = ("loss", "accuracy")

    def __init__(
        self,
        model: str = TINY,
        splitter: str = "official",
        segment_weight: float = 0.0,
        logit_scale: float | None = None,
        gradient_checkpointing: bool = False,
        direction_captions: int = 2048,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        seed: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.optimizer_factory, self.scheduler_factory = optimizer, lr_scheduler
        clip_model, tokenizer, processor = load_clip(model, seed=seed)
        if gradient_checkpointing:
            clip_model.gradient_checkpointing_enable()
        if logit_scale is not None:
            # fixed: neither trained nor in the optimizer
            clip_model.logit_scale.requires_grad_(False)
        self.scorer = Denscore(HFClip(clip_model, tokenizer, processor), splitter=splitter)
        self.scorer.train()
        self.splitter, self.segment_weight = splitter, segment_weight
        self.fixed_logit_scale = logit_scale
        self._recent: collections.deque[str] = collections.deque(maxlen=direction_captions)

    @property
    def clip(self):
        return self.scorer.clip.model

    # ---- scoring ---------------------------------------------------------------------------------
    def current_logit_scale(self) -> torch.Tensor:
        if self.fixed_logit_scale is not None:
            return torch.tensor(float(self.fixed_logit_scale), device=self.device)
        return self.clip.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)

    def pair_loss(self, batch: dict):
        captions = list(batch["caption"])
        b = len(captions)
        image_emb = F.normalize(self.scorer.image_features(batch["pixel_values"]).float(), dim=-1)
        texts = embed_prompt_segments(self.scorer, captions, self.splitter, grad=True)
        if not bool(texts.has_text.all()):
            raise ValueError(
                "a caption without segments reached the preference loss; the data module drops them"
            )
        img_0, img_1 = image_emb[:b], image_emb[b:]
        scores_0 = segment_score(img_0, texts.embeddings, texts.mask)
        scores_1 = segment_score(img_1, texts.embeddings, texts.mask)
        seg_0 = segment_cosines(img_0, texts.embeddings)
        seg_1 = segment_cosines(img_1, texts.embeddings)
        return preference_loss(
            scores_0,
            scores_1,
            batch["label_0"],
            batch["label_1"],
            self.current_logit_scale(),
            segment_scores_0=seg_0,
            segment_scores_1=seg_1,
            segment_mask=texts.mask,
            segment_weight=self.segment_weight,
        )

    def training_step(self, batch: dict, batch_idx: int):
        out = self.pair_loss(batch)
        self._recent.extend(batch["caption"])
        self.log_metrics("train", out.metrics(), len(batch["caption"]))
        self.log("train/logit_scale", self.current_logit_scale().detach())
        self.log_skipped(batch)
        return out.loss

    def validation_step(self, batch: dict, batch_idx: int):
        out = self.pair_loss(batch)
        self.log_metrics("val", out.metrics(), len(batch["caption"]))

    def log_metrics(self, prefix: str, metrics: dict[str, torch.Tensor], batch_size: int) -> None:
        super().log_metrics(prefix, {k: v.float() for k, v in metrics.items()}, batch_size)

    def on_fit_start(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        size = getattr(dm, "image_size", None)
        expected = self.clip.config.vision_config.image_size
        if size is not None and size != expected:
            raise ValueError(
                f"the data module crops {size} px but the CLIP vision tower takes {expected} px"
            )

    # ---- export ----------------------------------------------------------------------------------
    @torch.no_grad()
    def export_direction(self, captions: list[str] | None = None) -> torch.Tensor | None:
        """The common direction of ``captions`` (default: the recent training captions) under the
        current model."""
        captions = list(self._recent) if captions is None else captions
        was_training = self.scorer.training
        self.scorer.eval()
        try:
            return estimate_direction(self.scorer, captions, self.splitter)
        except DegenerateDirection as err:
            log.warning("no common direction in the export: %s", err)
            return None
        finally:
            self.scorer.train(was_training)

    def export(self, out_dir: str | Path) -> Path:
        """A Denscore directory (``align.rewards.denscore`` layout) that
        ``build_reward('denscore', out_dir)`` loads."""
        proc = self.scorer.clip.processor
        return write_denscore_export(
            self.clip,
            self.scorer.clip.tokenizer,
            out_dir,
            image_size=crop_size(proc),
            image_mean=proc.image_mean,
            image_std=proc.image_std,
            direction=self.export_direction(),
            splitter=self.splitter,
        )
