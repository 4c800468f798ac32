"""Render a few fixed (long) prompts with fixed seeds every N steps: what the policy draws, as it
trains.

With ``compare_reference`` (on by default for modules that have a reference: DPO, KTO) each logged
image is the policy's and the reference's side by side, from the same noise, labelled
``policy | reference``; with ``reward`` set, both are scored by that reward model and the means are
logged as ``val/reward/<name>/policy`` and ``.../reference``.

Images go to every logger that has ``log_image`` (wandb: one panel per prompt, the caption under it)
and, as PNGs, to ``<run>/images/step-<N>/`` (so a CSV-only run has them too). Rendering uses the
module's own prompt encoder (segment encoding for LongAlign) through
``align.models.sampling.generate``, on global rank 0 only, with the module in eval mode (adapter
dropout off) and in the trainer's precision (bf16 autocast in ``bf16-mixed``); the training RNG
streams are untouched.
"""

from __future__ import annotations

import logging

import lightning as L
import torch

from align.callbacks.run_dir import refuse_fsdp, run_dir
from align.rewards import build_reward

log = logging.getLogger(__name__)

# Long prompts (well over CLIP's 77 tokens) whose later sentences matter.
DEFAULT_PROMPTS = [
    "A quiet harbour town at dawn, seen from a hill above the bay. Small fishing boats painted "
    "red, blue and yellow rest on calm water that mirrors the pale pink sky. Whitewashed houses "
    "with terracotta roofs climb the slope on the left, and a stone lighthouse stands at the end "
    "of a long pier on the right. A flock of seagulls circles above the masts. In the foreground, "
    "an old wooden bench faces the sea, with a folded newspaper and a steaming cup of coffee left "
    "on it. Thin mist hangs over the water near the horizon.",
    "A cosy reading corner in a small apartment, photographed in warm afternoon light. A deep "
    "green velvet armchair sits beside a tall window with white curtains. On the armchair lies a "
    "tartan blanket and an open hardcover book. To the right, a round side table holds a brass "
    "lamp, a stack of three paperbacks and a potted fern. A grey cat sleeps curled up on the rug "
    "in front of the chair. The wall behind is covered by a bookshelf filled with colourful "
    "books, and a small framed painting of a sailboat hangs above it.",
    "A red circle in the top left corner, a blue square in the center and a yellow triangle in "
    "the bottom right corner, all on a plain white background. The circle is small, the square is "
    "large and the triangle is small. The shapes have sharp edges and uniform colours. The square "
    "is to the right of the circle, and the triangle is below the square. Nothing else appears in "
    "the image, and the background is completely even, without texture, shadows or text.",
]


class ValidationImages(L.Callback):
    """Renders ``prompts`` and logs them every ``every_n_steps`` optimizer steps (and at the end).

    Args:
        prompts: the prompts (default: three long ones, ``DEFAULT_PROMPTS``).
        every_n_steps: render when ``global_step`` is a positive multiple of this.
        seed: every image starts from ``torch.Generator('cpu').manual_seed(seed)``: the same noise
            each time.
        steps / guidance_scale / negative_prompt / height / width: sampling settings (default
            size: the model's).
        scheduler: a diffusers scheduler class built from the model's scheduler config (SD3 and
            FLUX.1 sample with their own flow sampler whatever this says).
        at_start / at_end: also render before the first step / after the last.
        key: the logged image key (``val/images``).
    """

    def __init__(
        self,
        prompts: list[str] | None = None,
        every_n_steps: int = 500,
        seed: int = 0,
        steps: int = 25,
        guidance_scale: float = 7.5,
        negative_prompt: str = "",
        height: int | None = None,
        width: int | None = None,
        scheduler: str = "DDIMScheduler",
        at_start: bool = False,
        at_end: bool = True,
        key: str = "val/images",
        compare_reference: bool = True,
        reward: str | None = None,
        reward_source: str | None = None,
    ):
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.prompts = list(prompts) if prompts else list(DEFAULT_PROMPTS)
        self.every_n_steps, self.seed, self.steps = every_n_steps, seed, steps
        self.guidance_scale, self.negative_prompt = guidance_scale, negative_prompt
        self.height, self.width, self.scheduler = height, width, scheduler
        self.at_start, self.at_end, self.key = at_start, at_end, key
        self.compare_reference = compare_reference
        self.reward_name, self.reward_source = reward, reward_source
        self._reward = None
        self.rendered_steps: list[int] = []

    # ---- when ------------------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage) -> None:
        refuse_fsdp(trainer, self)

    def on_train_start(self, trainer, pl_module) -> None:
        if self.at_start:
            self.render_and_log(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step > 0 and step % self.every_n_steps == 0 and step not in self.rendered_steps:
            self.render_and_log(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.at_end and trainer.global_step not in self.rendered_steps:
            self.render_and_log(trainer, pl_module)

    # ---- what ------------------------------------------------------------------------------------
    def score(self, images, device) -> float:
        if self._reward is None:
            self._reward = build_reward(self.reward_name, self.reward_source, device=device)
        return float(self._reward.score(images, list(self.prompts)).float().mean())

    @torch.no_grad()
    def render(self, trainer, pl_module, unet=None) -> list:
        """PIL images of ``self.prompts`` from the module's weights (or ``unet``) and prompt
        encoder."""
        import diffusers

        from align.models.sampling import policy_images

        if pl_module.components.is_flow:
            scheduler = pl_module.components.sampler()
        else:
            scheduler = getattr(diffusers, self.scheduler).from_config(pl_module.scheduler.config)
        return policy_images(
            pl_module,
            self.prompts,
            [self.seed] * len(self.prompts),
            self.steps,
            self.guidance_scale,
            context=trainer.precision_plugin.forward_context(),
            unet=unet,
            scheduler=scheduler,
            negative_prompt=self.negative_prompt,
            height=self.height,
            width=self.width,
        )

    def render_and_log(self, trainer, pl_module) -> None:
        step = trainer.global_step
        self.rendered_steps.append(step)
        # every rank: run_dir broadcasts
        out = run_dir(trainer) / "images" / f"step-{step:06d}"
        if not trainer.is_global_zero:
            return
        images, reference, metrics = self.render(trainer, pl_module), None, {}
        has_reference = getattr(pl_module, "ref_unet", None) is not None or getattr(
            pl_module, "use_lora_reference", False
        )
        if self.compare_reference and has_reference:
            # the same noise through the frozen copy, or through the UNet without its adapters
            with pl_module.reference_denoiser() as unet:
                reference = self.render(trainer, pl_module, unet=unet)
        if self.reward_name:
            key = f"val/reward/{self.reward_name}"
            metrics[f"{key}/policy"] = self.score(images, pl_module.device)
            if reference is not None:
                metrics[f"{key}/reference"] = self.score(reference, pl_module.device)
        if reference is not None:
            images = [side_by_side(a, b) for a, b in zip(images, reference)]
        out.mkdir(parents=True, exist_ok=True)
        (out / "prompts.txt").write_text("".join(p.replace("\n", " ") + "\n" for p in self.prompts))
        for i, image in enumerate(images):
            image.save(out / f"{i:02d}.png")
        for logger in trainer.loggers:
            if metrics:
                logger.log_metrics(metrics, step=step)
            if hasattr(logger, "log_image"):
                logger.log_image(key=self.key, images=images, step=step, caption=list(self.prompts))
        log.info("validation images for step %d in %s", step, out)


def side_by_side(left, right, labels=("policy", "reference"), min_size: int = 128):
    """One image: ``left`` (policy) and ``right`` (reference) next to each other, each under its
    label; images smaller than ``min_size`` are enlarged (nearest neighbour, so pixels stay
    pixels) to be readable."""
    from PIL import Image, ImageDraw

    scale = max(1, -(-min_size // max(left.height, 1)))
    left, right = (
        im.resize((im.width * scale, im.height * scale), Image.NEAREST) for im in (left, right)
    )
    strip = 14
    size = (left.width + right.width, max(left.height, right.height) + strip)
    canvas = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(canvas)
    for x, image, label in ((0, left, labels[0]), (left.width, right, labels[1])):
        draw.text((x + 3, 1), label, fill="black")
        canvas.paste(image, (x, strip))
    return canvas
