"""LongAlign's reward fine-tuning (RFT) as a LightningModule: prompts in, 0.5 * (1 - mean S_w) out.

Per step (official ``unet_reward.py``; DESIGN.md "LongAlign"):

1. encode the prompts and the empty prompt with the same (segment) encoder; start from Gaussian noise;
2. DDIM (eta 0, "trailing" timesteps: 999, 979, ..., 19 for 50 steps) with classifier-free guidance. The UNet
   always sees the current latents *detached*; at ``grad_steps`` evenly spaced steps (stride
   ``num_steps // grad_steps``, a random offset in [0, stride)) its call keeps gradients (through
   ``torch.utils.checkpoint``, so its activations are recomputed in backward), at every other step it runs under
   ``no_grad``. The DDIM update itself stays differentiable, so the reward's gradient reaches each chosen step's
   UNet output through the (linear) chain of updates that follow it, and no other UNet call;
3. decode the last step's x0 prediction with the VAE (frozen; gradients flow through it to the latents), map to
   [0, 1] (optionally random-crop first, as the official 504-px crop of 512-px images);
4. score with a registry reward at segment level: S_w = <img, t - eta v> + w * eta <img, v>, v = the common text
   direction of the batch across ranks (``direction: batch``) or a saved one (``direction: <file>``); loss =
   ``rft_loss`` = 0.5 * (1 - mean S_w).

A reward without embeddings (not CLIP-based, e.g. the shapes world's ``shapes-judge``) is used *directly*, as in
DRaFT / AlignProp: step 4 becomes loss = 1 - mean ``reward.score(images, prompts, grad=True)`` (the reward is
expected in [0, 1], higher better), logged as ``train/reward_mean`` / ``val/reward_mean``; ``w``,
``direction``, ``direction_fallback`` and ``splitter`` do not apply to it. Steps 1-3 are the same.

Bad input is skipped and logged, never trained on: prompts without segments are dropped
(``train/skipped_no_segments``; the prompt data module already drops them at read time); a batch that cannot
define a direction (one prompt) uses ``direction_fallback`` (``train/direction_fallback``) or, without one, is
skipped (``train/skipped_degenerate``); a non-finite reward skips the step (``train/skipped_nonfinite``). Under DDP these decisions are all-reduced so every rank skips
together (a rank that skipped alone would hang the gradient all-reduce).

The policy is a *new* LoRA (``lora_rank`` > 0) on top of the SFT model: ``model`` is the base (a preset, a
diffusers directory or hub id; a full SFT export is itself a diffusers directory) and ``init_lora`` an SFT LoRA
export that is merged into the base weights first. The prompt encoder defaults to the one recorded in the SFT
export (``prompt_encoder.json``, T5 adapter included, frozen here). Export: the new LoRA
(``pytorch_lora_weights.safetensors``), ``prompt_encoder.json`` (+ ``text_adapter/``) and ``rft.json`` naming the
base and the SFT LoRA it sits on: load both LoRAs (``load_lora_weights(sft, adapter_name="sft")``, then this one)
to sample.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

from align.models.embeds import PromptEmbeds
from align.models.sampling import SPEC_FILE, save_prompt_encoder
from align.modules.base import DiffusionModule
from align.objectives.distributed import is_distributed
from align.objectives.reward import DegenerateDirection, NonFiniteReward, load_direction, rft_loss

log = logging.getLogger(__name__)


def grad_step_indices(num_steps: int, grad_steps: int, offset: int) -> list[int]:
    """``grad_steps`` indices evenly spaced by ``num_steps // grad_steps``, starting at ``offset``."""
    if not 1 <= grad_steps <= num_steps:
        raise ValueError(f"grad_steps must be in [1, num_steps={num_steps}], got {grad_steps}")
    stride = num_steps // grad_steps
    if not 0 <= offset < stride:
        raise ValueError(f"offset must be in [0, {stride}), got {offset}")
    return [offset + stride * k for k in range(grad_steps)]


def ddim_timesteps(num_train_timesteps: int, num_steps: int) -> torch.Tensor:
    """DDIM's "trailing" spacing (the official 999, 979, ..., 19 for 1000 / 50)."""
    ts = torch.arange(num_train_timesteps, 0, -num_train_timesteps / num_steps).round().long() - 1
    return ts[:num_steps]


def read_encoder_spec(export_dir: str | Path | None) -> tuple[str, dict] | None:
    """(kind, args) of ``<export>/prompt_encoder.json`` (T5 adapter path made absolute), or None."""
    if export_dir is None:
        return None
    path = Path(export_dir).expanduser() / SPEC_FILE
    if not path.is_file():
        return None
    spec = json.loads(path.read_text())
    args = dict(spec.get("args") or {})
    if args.get("t5"):
        args["t5"] = {**args["t5"], "adapter": str(path.parent / args["t5"]["adapter"])}
    return spec["kind"], args


def merge_lora_into_unet(unet, source: str | Path, sdxl: bool = False) -> int:
    """Fuse a diffusers-format LoRA export (UNet part) into ``unet``'s base weights with diffusers' own
    ``fuse_lora`` + ``unload_lora`` (the export's adapter config, alpha included, sets the scale, as
    ``load_lora_weights`` does). Call it before the UNet gets an adapter of its own: peft keeps a fused
    layer marked merged. Returns the number of layers fused."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from peft.tuners.tuners_utils import BaseTunerLayer

    source = Path(source).expanduser()
    if not source.exists():
        raise FileNotFoundError(f"init_lora {source} does not exist")
    loader = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    state, alphas, metadata = loader.lora_state_dict(str(source), return_lora_metadata=True)
    state = {k: v for k, v in state.items() if k.startswith("unet.")}
    if not state:
        raise ValueError(f"init_lora {source} holds no UNet LoRA weights")
    if alphas is not None:
        alphas = {k: v for k, v in alphas.items() if k.startswith("unet.")} or None
    scale = {"metadata": metadata} if metadata else {"network_alphas": alphas}
    unet.load_lora_adapter(state, prefix="unet", adapter_name="init_lora", **scale)
    fused = sum(isinstance(module, BaseTunerLayer) for module in unet.modules())
    unet.fuse_lora(adapter_names=["init_lora"])
    unet.unload_lora()
    return fused


class RFTModule(DiffusionModule):
    """Reward fine-tuning with LongAlign's decomposed, reweighted segment-level preference score.

    Args:
        reward / reward_source / reward_options: a registry reward, where its weights are, and extra factory
            options. Frozen, never checkpointed. A CLIP-based one (``denscore``, ``pickscore``, ``hps``,
            ``clip``) gets LongAlign's segment-level S_w; any other (``shapes-judge``) is maximised directly
            (loss = 1 - mean score; see the module doc).
        reward_dtype: ``float32`` or ``bfloat16`` for the reward's weights.
        w: the weight of the text-irrelevant part in S_w (0.3; 1 recovers the original score). ``w``,
            ``direction``, ``direction_fallback`` and ``splitter`` apply to CLIP-based rewards only.
        direction: ``batch`` (v per batch, averaged across ranks) or a saved direction file (fixed v).
        direction_fallback: a saved direction used when a batch cannot define one (None: skip such batches).
        splitter: how prompts are split into segments for the reward (``official``).
        num_steps / grad_steps / guidance_scale: DDIM steps, steps that keep gradients, CFG scale.
        resolution: image side in pixels (None: the model's native resolution).
        reward_random_crop: random-crop decoded images to this side before the reward (official: 504 of 512).
        vae_checkpointing: recompute the VAE decoder in backward instead of keeping its activations.
        init_lora: an SFT LoRA export merged into the base UNet before the new LoRA is trained.
        Everything else: see ``DiffusionModule`` (``lora_rank`` > 0 is required).
    """

    needs_reference = False

    def __init__(self, reward: str = "denscore", reward_source: str | None = None, reward_options: dict | None = None,
                 reward_dtype: str = "float32", w: float = 0.3, direction: str = "batch",
                 direction_fallback: str | None = None, splitter: str = "official", num_steps: int = 50,
                 grad_steps: int = 5, guidance_scale: float = 7.5, resolution: int | None = None,
                 reward_random_crop: int | None = None, vae_checkpointing: bool = False,
                 init_lora: str | None = None, **kwargs):
        if kwargs.get("lora_rank", 0) <= 0:
            raise ValueError("RFT trains a new LoRA on top of the SFT model: set lora_rank > 0")
        grad_step_indices(num_steps, grad_steps, 0)  # validates the pair before anything is loaded
        if init_lora is not None and not Path(init_lora).expanduser().exists():
            raise FileNotFoundError(f"init_lora {init_lora} does not exist")
        # everything that can be missing is loaded before the (large) diffusion model
        fixed = None if direction == "batch" else load_direction(direction)
        fallback = None if direction_fallback is None else load_direction(direction_fallback)
        from align.rewards import build_reward
        from align.rewards import denscore as _denscore  # noqa: F401  (registers "denscore")

        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[reward_dtype]
        reward_model = build_reward(reward, reward_source, dtype=dtype, **(reward_options or {}))
        # no embeddings: LongAlign's decomposition does not apply; the reward is maximised directly
        direct = not all(hasattr(reward_model, a) for a in ("embed_images", "embed_segments"))
        if kwargs.get("prompt_encoder_args") is None:
            spec = read_encoder_spec(init_lora) or read_encoder_spec(_local_dir(kwargs.get("model")))
            if spec is not None:
                kwargs["prompt_encoder"], kwargs["prompt_encoder_args"] = spec
                log.info("RFT prompt encoder from the SFT export: %s %s", *spec)
        self._sft_lora = init_lora  # fused into the base UNet before the new adapter (prepare_unet)
        super().__init__(**kwargs)
        self.encoder_kind = kwargs.get("prompt_encoder", "clip")
        self.encoder_args = kwargs.get("prompt_encoder_args")
        self.reward_model, self.direct_reward = reward_model, direct
        self.w, self.splitter = w, splitter
        self.num_steps, self.grad_steps, self.guidance_scale = num_steps, grad_steps, guidance_scale
        self.resolution = resolution or self.components.resolution
        self.reward_random_crop, self.vae_checkpointing = reward_random_crop, vae_checkpointing
        self.register_buffer("fixed_direction", fixed, persistent=False)
        self.register_buffer("fallback_direction", fallback, persistent=False)
        self.register_buffer("alphas_cumprod", self.scheduler.alphas_cumprod.clone().float(), persistent=False)
        self.init_lora = init_lora
        self._counts: dict[str, int] = {}

    def prepare_unet(self, unet: torch.nn.Module) -> None:
        if self._sft_lora is not None:
            fused = merge_lora_into_unet(unet, self._sft_lora, sdxl=self.components.is_sdxl)
            log.info("fused %d LoRA layers of %s into the base UNet", fused, self._sft_lora)

    # ---- frozen parts -------------------------------------------------------------------------------
    def trainable_prompt_parts(self) -> list[torch.nn.Module]:
        return []  # RFT trains the new LoRA only; an SFT T5 adapter stays frozen

    def frozen_modules(self) -> list[torch.nn.Module]:
        reward = getattr(self, "reward_model", None)
        return super().frozen_modules() + ([reward] if reward is not None else [])

    # ---- sampling -----------------------------------------------------------------------------------
    def grad_indices(self, step: int | None = None) -> list[int]:
        """This step's gradient steps: evenly spaced, random offset (reproducible from seed and step)."""
        step = self.global_step if step is None else step
        stride = self.num_steps // self.grad_steps
        offset = random.Random(self.hparams.seed * 1_000_003 + step).randrange(stride)
        return grad_step_indices(self.num_steps, self.grad_steps, offset)

    def guided_prediction(self, x: torch.Tensor, t: torch.Tensor, cond: PromptEmbeds,
                          time_ids: torch.Tensor | None) -> torch.Tensor:
        """CFG: one UNet call on [x; x] with [cond; uncond] -> uncond + s * (cond - uncond)."""
        n = x.shape[0]
        out = self.unet_forward(self.unet, torch.cat([x, x]), t.expand(2 * n), cond, time_ids)
        c, u = out[:n], out[n:]
        return u + self.guidance_scale * (c - u)

    def _x0_eps(self, pred: torch.Tensor, x: torch.Tensor, a_t: torch.Tensor):
        pred = pred.float()
        if self.prediction_type == "epsilon":
            return (x - (1 - a_t).sqrt() * pred) / a_t.sqrt(), pred
        if self.prediction_type == "v_prediction":
            return a_t.sqrt() * x - (1 - a_t).sqrt() * pred, a_t.sqrt() * pred + (1 - a_t).sqrt() * x
        raise ValueError(f"unsupported prediction_type {self.prediction_type!r}")

    def rollout(self, prompts: list[str], grad_indices: list[int], noise: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """DDIM with CFG from noise; returns the last step's x0 prediction (latents), differentiable through
        the UNet calls at ``grad_indices`` only."""
        n = len(prompts)
        with torch.no_grad():
            cond, uncond = self.encode_prompts(prompts), self.encode_prompts([""] * n)
        pooled = None if cond.pooled is None else torch.cat([cond.pooled, uncond.pooled])
        both = PromptEmbeds(torch.cat([cond.embeds, uncond.embeds]), pooled)
        time_ids = self.time_ids({}, 2 * n)
        if noise is None:
            side = self.resolution // self.components.vae_scale_factor
            noise = torch.randn((n, self.unet.config.in_channels, side, side), generator=generator,
                                device=self.device if generator is None else generator.device).to(self.device)
        timesteps = ddim_timesteps(self.scheduler.config.num_train_timesteps, self.num_steps).to(self.device)
        alphas = self.alphas_cumprod.to(self.device)
        chosen = set(grad_indices)
        x, x0 = noise.float(), None
        for i, t in enumerate(timesteps):
            a_t = alphas[t]
            a_prev = alphas[timesteps[i + 1]] if i + 1 < len(timesteps) else alphas[0]
            x_in = x.detach()  # official: the UNet never differentiates through its input
            if i in chosen and torch.is_grad_enabled():
                pred = checkpoint(self.guided_prediction, x_in, t, both, time_ids, use_reentrant=False)
            else:
                with torch.no_grad():
                    pred = self.guided_prediction(x_in, t, both, time_ids)
            x0, eps = self._x0_eps(pred, x, a_t)
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        return x0

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [0, 1] (float32), differentiable w.r.t. the latents (the VAE is frozen)."""
        vae = self.vae
        z = latents / vae.config.scaling_factor
        shift = getattr(vae.config, "shift_factor", None)
        if shift:
            z = z + shift
        z = z.to(vae.dtype)

        def run(z):
            return vae.decode(z).sample

        images = checkpoint(run, z, use_reentrant=False) if self.vae_checkpointing and torch.is_grad_enabled() \
            else run(z)
        return (images.float() * 0.5 + 0.5).clamp(0, 1)

    def crop_for_reward(self, images: torch.Tensor) -> torch.Tensor:
        size = self.reward_random_crop
        if not size or min(images.shape[-2:]) <= size:
            return images
        h, w = images.shape[-2:]
        top, left = random.randrange(h - size + 1), random.randrange(w - size + 1)
        return images[..., top:top + size, left:left + size]

    # ---- reward ---------------------------------------------------------------------------------------
    def count(self, name: str, n: int = 1) -> None:
        self._counts[name] = self._counts.get(name, 0) + n

    def log_counts(self, prefix: str = "train") -> None:
        for name, total in self._counts.items():
            self.log(f"{prefix}/{name}", float(total), reduce_fx="max")

    @staticmethod
    def any_rank(flag: bool, device: torch.device) -> bool:
        """True on every rank if ``flag`` is True on any (a collective under DDP)."""
        if not is_distributed():
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def prepare_texts(self, prompts: list[str]):
        """(kept prompts, their SegmentTexts, v or None, v's source). Prompts without segments are dropped and
        counted; v comes from the batch (a collective), the fixed direction, or the fallback."""
        from align.rewards.segments import batch_direction, embed_prompt_segments

        with torch.no_grad():
            texts = embed_prompt_segments(self.reward_model, prompts, self.splitter)
        keep = texts.has_text
        dropped = int((~keep).sum())
        if dropped:
            log.warning("dropping %d prompt(s) without segments: %r", dropped,
                        [p for p, ok in zip(prompts, keep.tolist()) if not ok][:3])
            self.count("skipped_no_segments", dropped)
            prompts = [p for p, ok in zip(prompts, keep.tolist()) if ok]
            texts = texts.select(keep)
        if self.fixed_direction is not None:
            return prompts, texts, self.fixed_direction, "fixed"
        try:
            v, source = batch_direction(texts.text, fallback=self.fallback_direction)
        except DegenerateDirection as err:
            log.warning("skipping the batch: %s, and no direction_fallback is set", err)
            return prompts, texts, None, "degenerate"
        return prompts, texts, v, source

    def reward_scores(self, images: torch.Tensor, texts, direction: torch.Tensor, grad: bool):
        from align.rewards.segments import score_segments

        image_emb = self.reward_model.embed_images(self.crop_for_reward(images), grad=grad)
        return score_segments(self.reward_model, None, texts, direction, w=self.w, grad=grad, image_emb=image_emb)

    def direct_scores(self, prompts: list[str], grad_indices: list[int], grad: bool) -> torch.Tensor:
        """A direct reward's scores (N,) of a rollout for ``prompts``."""
        images = self.crop_for_reward(self.decode(self.rollout(prompts, grad_indices)))
        return self.reward_model.score(images, prompts, grad=grad)

    def direct_training_step(self, prompts: list[str]):
        """loss = 1 - mean reward (DRaFT / AlignProp), with the same skips as the CLIP path."""
        if self.any_rank(not prompts, self.device):
            self.count("skipped_empty_batch" if not prompts else "skipped_other_rank")
            self.log_counts()
            return None
        scores = self.direct_scores(prompts, self.grad_indices(), grad=True)
        if self.any_rank(not bool(torch.isfinite(scores.detach()).all()), self.device):
            self.count("skipped_nonfinite")
            log.warning("step %d: non-finite reward on some rank; skipping the step", self.global_step)
            self.log_counts()
            return None
        loss = 1 - scores.mean()
        self.log_metrics("train", {"loss": loss.detach(), "reward_mean": scores.detach().mean()}, len(prompts))
        self.log_counts()
        return loss

    def training_step(self, batch: dict, batch_idx: int):
        self.log_skipped(batch)
        if self.direct_reward:
            return self.direct_training_step(list(batch["caption"]))
        prompts, texts, v, source = self.prepare_texts(list(batch["caption"]))
        degenerate, empty = v is None, len(prompts) == 0
        if self.any_rank(degenerate or empty, self.device):
            self.count("skipped_empty_batch" if empty else "skipped_degenerate" if degenerate else "skipped_other_rank")
            self.log_counts()
            return None
        if source == "saved":
            self.count("direction_fallback")
        out = self.reward_scores(self.decode(self.rollout(prompts, self.grad_indices())), texts, v, grad=True)
        nonfinite = not bool(torch.isfinite(out.decomposed.weighted.detach()).all())
        if self.any_rank(nonfinite, self.device):
            self.count("skipped_nonfinite")
            log.warning("step %d: non-finite reward on some rank; skipping the step", self.global_step)
            self.log_counts()
            return None
        try:
            loss = rft_loss(out.decomposed.weighted)
        except NonFiniteReward:  # unreachable after the check above; never train on it regardless
            self.count("skipped_nonfinite")
            self.log_counts()
            return None
        self.log_reward("train", loss, out, len(prompts), source)
        self.log_counts()
        return loss

    def log_reward(self, prefix: str, loss: torch.Tensor, out, batch_size: int, source: str) -> None:
        metrics = {"loss": loss.detach(), **{f"reward_{k}": v for k, v in out.decomposed.metrics().items()}}
        metrics["direction_from_saved"] = torch.tensor(float(source == "saved"))
        self.log_metrics(prefix, metrics, batch_size)

    def validation_step(self, batch: dict, batch_idx: int):
        if self.direct_reward:
            return self.direct_validation_step(list(batch["caption"]), batch_idx)
        prompts, texts, v, source = self.prepare_texts(list(batch["caption"]))
        if self.any_rank(v is None or not prompts, self.device):
            return None
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.hparams.seed * 100_003 + batch_idx)
            out = self.reward_scores(self.decode(self.rollout(prompts, [])), texts, v, grad=False)
        if not bool(torch.isfinite(out.decomposed.weighted).all()):
            self.count("val_nonfinite")
            return None
        self.log_reward("val", 0.5 * (1 - out.decomposed.weighted.mean()), out, len(prompts), source)

    def direct_validation_step(self, prompts: list[str], batch_idx: int):
        if self.any_rank(not prompts, self.device):
            return None
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.hparams.seed * 100_003 + batch_idx)
            scores = self.direct_scores(prompts, [], grad=False)
        if not bool(torch.isfinite(scores).all()):
            self.count("val_nonfinite")
            return None
        self.log_metrics("val", {"loss": 1 - scores.mean(), "reward_mean": scores.mean()}, len(prompts))

    # ---- export -------------------------------------------------------------------------------------
    def export(self, out_dir: str | Path) -> Path:
        out = super().export(out_dir)
        save_prompt_encoder(self.prompt_encoder, out, self.encoder_kind, self.encoder_args)
        info = {"base_model": self.hparams.get("model"), "init_lora": self.init_lora, "lora_rank": self.hparams.lora_rank,
                "reward": self.hparams.get("reward"), "reward_source": self.hparams.get("reward_source"), "w": self.w,
                "load": "pipe = from_pretrained(base_model); pipe.load_lora_weights(init_lora, adapter_name='sft'); "
                        "pipe.load_lora_weights(<this dir>, adapter_name='rft'); "
                        "pipe.set_adapters(['sft', 'rft'], [1.0, 1.0])"}
        (Path(out) / "rft.json").write_text(json.dumps(info, indent=2) + "\n")
        return out


def _local_dir(model: str | None) -> str | None:
    return model if model and Path(model).expanduser().is_dir() else None
