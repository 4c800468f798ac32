"""The one small interface every reward model sits behind, and the pieces CLIP-based rewards share.

A reward maps (images, prompts) to one score per image: ``reward.score(images, prompts)``. Images
are a list of PIL images (each model then applies its original preprocessing, PIL resampling
included) or a float tensor (N, 3, H, W) in [0, 1] (a decoded batch during reward fine-tuning: the
same steps done with differentiable torch ops). Scoring is batched and runs under ``no_grad`` unless
``grad=True``.

CLIP-based rewards (PickScore, HPSv2, CLIP score, the aesthetic predictor) also expose their
embeddings, ``embed_images`` / ``embed_texts`` (L2-normalised by default), and ``embed_segments``:
LongAlign's segment-level text embeddings (a caption split into segments, each embedded on its own).
``segment_scores`` and ``decomposed_scores`` apply LongAlign's pure functions
(``align.objectives.reward``) to these embeddings, so every CLIP-based reward gets them from this
base class, without a copy per model.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from align.models.splitters import official_split
from align.objectives.reward import decomposed_score, segment_score, segment_text_embedding

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class RewardSourceError(FileNotFoundError):
    """A reward model's weights or configuration could not be found;
    the message names what was looked for."""


def to_rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")


# --------------------------------------------------------------------------------------------------
# Preprocessing; torchvision is imported on first use (about 1 s).
# --------------------------------------------------------------------------------------------------
def check_tensor_images(images: torch.Tensor) -> torch.Tensor:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(
            f"image tensors must be (N, 3, H, W) in [0, 1]; got shape {tuple(images.shape)}"
        )
    return images


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Per-channel ``(images - mean) / std`` as torchvision's ``normalize`` computes it, without
    its ``std == 0`` check, a device sync at every differentiable reward batch."""
    mean_t = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    return (images - mean_t) / std_t


def clip_preprocess_tensor(
    images: torch.Tensor,
    resize: int | None,
    crop: int | None,
    mean: Sequence[float],
    std: Sequence[float],
) -> torch.Tensor:
    """CLIP's ``Resize(resize, BICUBIC)`` (shorter side, antialiased), ``CenterCrop(crop)`` and
    ``Normalize(mean, std)`` (None skips a step) on (N, 3, H, W) in [0, 1], differentiable."""
    from torchvision.transforms import InterpolationMode, functional as TF

    if resize is not None:
        images = check_tensor_images(images)
        images = TF.resize(images, resize, InterpolationMode.BICUBIC, antialias=True)
    if crop is not None:
        h, w = images.shape[-2:]
        if h < crop or w < crop:  # torchvision would pad instead
            raise ValueError(f"cannot center-crop {crop} from an image of {h}x{w}")
        images = TF.center_crop(images, crop)
    return normalize(images, mean, std)


@functools.cache
def openai_clip_transform(size: int = 224):
    """OpenAI CLIP's ``_transform(n_px)`` (also ImageReward's and the LAION aesthetic predictor's):
    PIL bicubic resize of the shorter side, center crop, RGB, ToTensor,
    normalise with the OpenAI CLIP statistics."""
    from torchvision import transforms as T

    return T.Compose(
        [
            T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(size),
            to_rgb,
            T.ToTensor(),
            T.Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
        ]
    )


class OpenAIClipPreprocess:
    """OpenAI CLIP's preprocessing at ``self.image_size`` (ImageReward, the aesthetic predictor):
    ``openai_clip_transform`` for PIL images, the same steps as tensor ops for tensors."""

    image_size: int

    def preprocess_pil(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return torch.stack([openai_clip_transform(self.image_size)(im) for im in images])

    def preprocess_tensor(self, images: torch.Tensor) -> torch.Tensor:
        size = self.image_size
        return clip_preprocess_tensor(images, size, size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)


# --------------------------------------------------------------------------------------------------
# The interface.
# --------------------------------------------------------------------------------------------------
class RewardModel(nn.Module):
    """Images + prompts -> one score per image. Subclasses implement ``preprocess_pil``,
    ``preprocess_tensor`` and ``forward(pixel_values, prompts)``; batching,
    grad control and device handling live here."""

    name: str = "reward"
    default_batch_size: int = 32

    # -- to implement ------------------------------------------------------------------------------
    def preprocess_pil(self, images: Sequence[Image.Image]) -> torch.Tensor:
        raise NotImplementedError

    def preprocess_tensor(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, pixel_values: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError

    # -- shared ------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next((p.device for p in self.parameters()), torch.device("cpu"))

    @property
    def dtype(self) -> torch.dtype:
        return next((p.dtype for p in self.parameters() if p.is_floating_point()), torch.float32)

    def freeze(self) -> "RewardModel":
        """Eval mode, no parameter requires grad (gradients still flow to the *input* with
        ``grad=True``)."""
        return self.eval().requires_grad_(False)

    def pixel_values(self, images) -> torch.Tensor:
        """Model-ready pixels: the original PIL preprocessing for PIL images,
        the differentiable one for tensors."""
        if isinstance(images, torch.Tensor):
            out = self.preprocess_tensor(images.to(self.device, torch.float32))
        else:
            out = self.preprocess_pil([to_rgb(im) for im in images]).to(self.device)
        return out.to(self.dtype)

    def score(
        self,
        images,
        prompts: Sequence[str] | str,
        batch_size: int | None = None,
        grad: bool = False,
    ) -> torch.Tensor:
        """Scores (float32, shape (N,), on the model's device) of ``images`` for ``prompts`` (one
        per image, or one string for all). ``grad=True`` keeps the graph (needs tensor images to
        reach the pixels)."""
        n = len(images)
        prompts = [prompts] * n if isinstance(prompts, str) else list(prompts)
        if len(prompts) != n:
            raise ValueError(f"{self.name}: {n} images but {len(prompts)} prompts")
        score = lambda ims, texts: self(self.pixel_values(ims), texts).reshape(-1)
        out = self.batched(score, batch_size, grad, images, prompts)
        return torch.cat(out) if out else torch.zeros(0, device=self.device)

    def batched(self, fn: Callable, batch_size: int | None, grad: bool, *seqs) -> list:
        """``fn`` (as float32) of consecutive batches of ``seqs``, sliced alike (``batch_size``,
        default ``default_batch_size``), with gradients only if ``grad``."""
        size = batch_size or self.default_batch_size
        with torch.set_grad_enabled(grad):
            return [
                fn(*(x[i : i + size] for x in seqs)).float() for i in range(0, len(seqs[0]), size)
            ]

    def extra_repr(self) -> str:
        return f"name={self.name!r}"


class ClipRewardModel(RewardModel):
    """A reward computed from CLIP-style image and text embeddings.

    Subclasses implement ``image_features(pixel_values)`` and ``text_features(prompts)`` (the
    model's projected, *unnormalised* features) and ``score_embeddings(image_emb, text_emb)``
    (row-wise, from normalised embeddings). Everything else,
    including LongAlign's segment embeddings, is shared.
    """

    #: whether the score depends on the prompt at all (False for the aesthetic predictor)
    uses_text: bool = True

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def text_features(self, prompts: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError

    def score_embeddings(
        self, image_emb: torch.Tensor, text_emb: torch.Tensor | None
    ) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, pixel_values: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        image_emb = F.normalize(self.image_features(pixel_values).float(), dim=-1)
        text_emb = (
            F.normalize(self.text_features(list(prompts)).float(), dim=-1)
            if self.uses_text
            else None
        )
        return self.score_embeddings(image_emb, text_emb)

    def embed_images(
        self, images, batch_size: int | None = None, grad: bool = False
    ) -> torch.Tensor:
        """L2-normalised image embeddings (N, D) in float32."""
        embed = lambda x: F.normalize(self.image_features(self.pixel_values(x)).float(), dim=-1)
        return torch.cat(self.batched(embed, batch_size, grad, images))

    def embed_texts(
        self, prompts: Sequence[str], batch_size: int | None = None, grad: bool = False
    ) -> torch.Tensor:
        """L2-normalised text embeddings (N, D) in float32."""
        embed = lambda x: F.normalize(self.text_features(x).float(), dim=-1)
        return torch.cat(self.batched(embed, batch_size, grad, list(prompts)))

    def embed_segments(
        self,
        captions: Sequence[str],
        split: Callable[[str], list[str]] = official_split,
        grad: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """LongAlign's segment-level text embeddings: each caption split into segments (LongAlign's
        own split by default), each segment embedded on its own (truncated at the text tower's
        length) and L2-normalised.

        Returns ``(embeddings, mask)``: (B, S_max, D) float32 right-padded with zeros and a (B,
        S_max) bool mask of real segments. All segments of the batch go through the text tower in
        one batched call.
        """
        segments = [split(c) for c in captions]
        emb = self.embed_texts([s for segs in segments for s in segs], grad=grad)
        lengths = [len(segs) for segs in segments]
        out = pad_sequence(list(emb.split(lengths)), batch_first=True)
        mask = (
            torch.arange(out.shape[1], device=emb.device)
            < torch.tensor(lengths, device=emb.device)[:, None]
        )
        return out, mask

    def segment_scores(
        self,
        images,
        captions: Sequence[str],
        split: Callable[[str], list[str]] = official_split,
        grad: bool = False,
    ) -> torch.Tensor:
        """LongAlign's segment-level score (B,): the mean over segments of cos(image, segment)
        (``align.objectives.reward.segment_score``), for every CLIP-based reward alike."""
        segments, mask = self.embed_segments(captions, split=split, grad=grad)
        with torch.set_grad_enabled(grad):
            return segment_score(self.embed_images(images, grad=grad), segments, mask)

    def decomposed_scores(
        self,
        images,
        captions: Sequence[str],
        direction: torch.Tensor,
        w: float = 0.3,
        split: Callable[[str], list[str]] = official_split,
        grad: bool = False,
    ):
        """LongAlign's decomposition of the segment score along ``direction`` (v): a
        ``DecomposedScore`` with the original, text-relevant, text-irrelevant and reweighted (``w``)
        scores (``align.objectives.reward.decomposed_score``)."""
        segments, mask = self.embed_segments(captions, split=split, grad=grad)
        with torch.set_grad_enabled(grad):
            text = segment_text_embedding(segments, mask)
            return decomposed_score(
                self.embed_images(images, grad=grad), text, direction.to(text.device), w=w
            )
