"""LongAlign's reward fine-tuning (RFT) as a LightningModule: prompts in, a reward objective out.

Per step (official ``unet_reward.py``; DESIGN.md "LongAlign"):

1. encode the prompts and the empty prompt with the same (segment) encoder;
   start from Gaussian noise;
2. DDIM (eta 0, "trailing" timesteps: 999, 979, ..., 19 for 50 steps) with classifier-free guidance.
   The UNet always sees the current latents *detached*; at ``grad_steps`` evenly spaced steps
   (stride ``num_steps // grad_steps``, a random offset in [0, stride)) its call keeps gradients
   (checkpointed: recomputed in backward), at every other step it runs under ``no_grad``. The DDIM
   update stays differentiable, so the reward's gradient reaches each chosen step's UNet output
   through the linear chain of updates that follow it, and no other UNet call;
3. decode the last step's x0 prediction with the (frozen) VAE to [0, 1];
4. the injected objective (``align.rewards.rft``) scores the images: LongAlign's segment-level S_w
   (loss 0.5 * (1 - mean S_w)) or a reward maximised directly (loss 1 - mean score).

Bad input is skipped and logged, never trained on: the objective drops prompts it cannot score and
names batches it cannot use (``train/skipped_no_segments``, ``train/skipped_degenerate``,
``train/direction_fallback``); a non-finite reward skips the step (``train/skipped_nonfinite``).
Under DDP these decisions are all-reduced so every rank skips together
(one rank skipping alone would hang).

The policy is a *new* LoRA (``lora_rank`` > 0) on top of the SFT model: ``model`` is the base and
``init_lora`` an SFT LoRA export fused into the base weights first. The prompt encoder defaults to
the one recorded in the SFT export (``prompt_encoder.json``, T5 adapter included, frozen here).
Export: the new LoRA, ``prompt_encoder.json`` (+ ``text_adapter/``) and ``rft.json`` naming the base
and the SFT LoRA it sits on: load both LoRAs (``load_lora_weights(sft, adapter_name="sft")``, then
this one) to sample.
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint

from align.models.sampling import read_prompt_encoder_spec, save_prompt_encoder
from align.modules.base import DiffusionModule
from align.modules.sampling import PolicySampling
from align.objectives.distributed import any_rank
from align.rewards.rft import RewardObjective

log = logging.getLogger(__name__)


def grad_step_indices(num_steps: int, grad_steps: int, offset: int) -> list[int]:
    """``grad_steps`` indices evenly spaced by ``num_steps // grad_steps``,
    starting at ``offset``."""
    if not 1 <= grad_steps <= num_steps:
        raise ValueError(f"grad_steps must be in [1, num_steps={num_steps}], got {grad_steps}")
    stride = num_steps // grad_steps
    if not 0 <= offset < stride:
        raise ValueError(f"offset must be in [0, {stride}), got {offset}")
    return [offset + stride * k for k in range(grad_steps)]


def read_encoder_spec(export_dir: str | Path | None) -> tuple[str, dict] | None:
    """(kind, args) of ``<export>/prompt_encoder.json`` (``~`` expanded), or None (also for a
    ``model`` that is a preset name or a hub id)."""
    return None if export_dir is None else read_prompt_encoder_spec(Path(export_dir).expanduser())


def merge_lora_into_unet(unet, source: str | Path, sdxl: bool = False) -> int:
    """Fuse a diffusers-format LoRA export (UNet part) into ``unet``'s base weights with diffusers'
    own ``fuse_lora`` + ``unload_lora`` (the export's adapter config, alpha included, sets the
    scale, as ``load_lora_weights`` does). Call it before the UNet gets an adapter of its own: peft
    keeps a fused layer marked merged. Returns the number of layers fused."""
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


class RFTModule(PolicySampling, DiffusionModule):
    """Reward fine-tuning: a new LoRA trained to maximise ``objective`` of its own samples.

    Args:
        objective: what is maximised, injected by the config (``align.rewards.rft``):
            ``SegmentPreference`` (LongAlign's S_w of a CLIP-based reward) or ``DirectReward``.
        num_steps / grad_steps / guidance_scale: DDIM steps, steps that keep gradients, CFG scale.
        resolution: image side in pixels (None: the model's native resolution).
        vae_checkpointing: recompute the VAE decoder in backward instead of keeping its activations.
        init_lora: an SFT LoRA export merged into the base UNet before the new LoRA is trained.
        Everything else: see ``DiffusionModule`` (``lora_rank`` > 0 is required).
    """

    needs_reference = False
    frozen_parts = DiffusionModule.frozen_parts + ("objective",)

    def __init__(
        self,
        objective: RewardObjective,
        num_steps: int = 50,
        grad_steps: int = 5,
        guidance_scale: float = 7.5,
        resolution: int | None = None,
        vae_checkpointing: bool = False,
        init_lora: str | None = None,
        **kwargs,
    ):
        if kwargs.get("lora_rank", 0) <= 0:
            raise ValueError("RFT trains a new LoRA on top of the SFT model: set lora_rank > 0")
        grad_step_indices(num_steps, grad_steps, 0)  # validates the pair before anything is loaded
        if init_lora is not None and not Path(init_lora).expanduser().exists():
            raise FileNotFoundError(f"init_lora {init_lora} does not exist")
        if kwargs.get("prompt_encoder_args") is None:
            spec = read_encoder_spec(init_lora) or read_encoder_spec(kwargs.get("model"))
            if spec is not None:
                kwargs["prompt_encoder"], kwargs["prompt_encoder_args"] = spec
                log.info("RFT prompt encoder from the SFT export: %s %s", *spec)
        self._sft_lora = init_lora  # fused into the base UNet before the new adapter (prepare_unet)
        super().__init__(**kwargs)
        if self.components.is_flow:  # its sampler backpropagates through deterministic DDIM
            raise ValueError(
                f"RFT (LongAlign's reward fine-tuning) trains the SD1.5/SDXL UNets; "
                f"{self.hparams.model!r} is {self.components.family}: use GRPOModule"
            )
        self.encoder_kind = kwargs.get("prompt_encoder", "clip")
        self.encoder_args = kwargs.get("prompt_encoder_args")
        self.objective = objective.eval().requires_grad_(False)
        self.hparams["objective"] = objective.config  # checked on resume, rebuilt by align export
        self.num_steps, self.grad_steps, self.guidance_scale = num_steps, grad_steps, guidance_scale
        self.resolution = resolution or self.components.resolution
        self.vae_checkpointing = vae_checkpointing
        self.setup_sampler(num_steps, eta=0.0)  # DDIM's trailing timesteps and alphas
        self.init_lora = init_lora
        self._counts: Counter[str] = Counter()

    def prepare_unet(self, unet: torch.nn.Module) -> None:
        if self._sft_lora is not None:
            fused = merge_lora_into_unet(unet, self._sft_lora, sdxl=self.components.is_sdxl)
            log.info("fused %d LoRA layers of %s into the base UNet", fused, self._sft_lora)

    # ---- frozen parts ----------------------------------------------------------------------------
    def trainable_prompt_parts(self) -> list[torch.nn.Module]:
        return []  # RFT trains the new LoRA only; an SFT T5 adapter stays frozen

    # ---- sampling --------------------------------------------------------------------------------
    def grad_indices(self, step: int | None = None) -> list[int]:
        """This step's gradient steps: evenly spaced, random offset
        (reproducible from seed and step)."""
        step = self.global_step if step is None else step
        stride = self.num_steps // self.grad_steps
        offset = random.Random(self.hparams.seed * 1_000_003 + step).randrange(stride)
        return grad_step_indices(self.num_steps, self.grad_steps, offset)

    def rollout(
        self,
        prompts: list[str],
        grad_indices: list[int],
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """DDIM with CFG from noise; returns the last step's x0 prediction (latents), differentiable
        through the UNet calls at ``grad_indices`` only."""
        both, time_ids = self.conditioning(prompts)
        if noise is None:
            noise = self.initial_noise(len(prompts), generator)
        chosen = set(grad_indices)
        x, x0 = noise.float(), None
        for i, t in enumerate(self.timesteps):
            a_t, a_prev = self.a_t[i], self.a_prev[i]
            x_in = x.detach()  # official: the UNet never differentiates through its input
            if i in chosen and torch.is_grad_enabled():
                pred = checkpoint(
                    self.guided_prediction, x_in, t, both, time_ids, use_reentrant=False
                )
            else:
                with torch.no_grad():
                    pred = self.guided_prediction(x_in, t, both, time_ids)
            x0, eps = self.x0_eps(pred, x, a_t)
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        return x0

    # ---- steps -----------------------------------------------------------------------------------
    def skip(self, name: str) -> None:
        """Count a skipped step under ``train/<name>`` (every rank skips together)."""
        self._counts[name] += 1
        self.log_counts()

    def log_counts(self) -> None:
        for name, total in self._counts.items():
            self.log(f"train/{name}", float(total), reduce_fx="max")

    def training_step(self, batch: dict, batch_idx: int):
        self.log_skipped(batch)
        prepared = self.objective.prepare(list(batch["caption"]))
        self._counts.update(prepared.counts)
        if any_rank(prepared.skip is not None, self.device):
            return self.skip(prepared.skip or "skipped_other_rank")
        images = self.decode(self.rollout(prepared.prompts, self.grad_indices()))
        loss, metrics = self.objective(images, prepared, grad=True)
        if any_rank(not bool(torch.isfinite(loss.detach())), self.device):
            log.warning(
                "step %d: non-finite reward on some rank; skipping the step", self.global_step
            )
            return self.skip("skipped_nonfinite")
        self.log_metrics("train", {"loss": loss.detach(), **metrics}, len(prepared.prompts))
        self.log_counts()
        return loss

    def validation_step(self, batch: dict, batch_idx: int):
        prepared = self.objective.prepare(list(batch["caption"]))
        if any_rank(prepared.skip is not None, self.device):
            return None
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.hparams.seed * 100_003 + batch_idx)
            images = self.decode(self.rollout(prepared.prompts, []))
            loss, metrics = self.objective(images, prepared, grad=False)
        if not bool(torch.isfinite(loss)):
            self._counts["val_nonfinite"] += 1
            return None
        self.log_metrics("val", {"loss": loss, **metrics}, len(prepared.prompts))

    # ---- export ----------------------------------------------------------------------------------
    def export(self, out_dir: str | Path) -> Path:
        out = super().export(out_dir)
        save_prompt_encoder(self.prompt_encoder, out, self.encoder_kind, self.encoder_args)
        info = {
            "base_model": self.hparams.get("model"),
            "init_lora": self.init_lora,
            "lora_rank": self.hparams.lora_rank,
            **self.objective.settings,
            "load": "pipe = from_pretrained(base_model); "
            "pipe.load_lora_weights(init_lora, adapter_name='sft'); "
            "pipe.load_lora_weights(<this dir>, adapter_name='rft'); "
            "pipe.set_adapters(['sft', 'rft'], [1.0, 1.0])",
        }
        (Path(out) / "rft.json").write_text(json.dumps(info, indent=2) + "\n")
        return out
