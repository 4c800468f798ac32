"""Each performance switch changes what runs, shown on the tiny preset on the CPU
(no timing anywhere)."""

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel

from align.bench.memory import SavedTensors, static_memory
from align.bench.step import BareStep, StepConfig, build_module, make_batch
from align.extras import MissingExtra


def unets(module):
    return [m for m in module.modules() if isinstance(m, UNet2DConditionModel)]


def saved_bytes_of_step(cfg: StepConfig) -> int:
    module = build_module(cfg)
    batch = make_batch(module, cfg)
    with SavedTensors([*module.parameters(), *module.buffers()]) as saved:
        loss = module.training_step(batch, 0)
    loss.backward()  # the graph is usable: nothing was dropped that backward needs
    return saved.bytes


def test_gradient_checkpointing_lowers_saved_activation_memory():
    plain = saved_bytes_of_step(StepConfig(batch=2))
    checkpointed = saved_bytes_of_step(StepConfig(batch=2, gradient_checkpointing=True))
    assert plain > 0 and checkpointed > 0
    assert checkpointed < 0.5 * plain


def test_checkpointed_step_has_the_same_loss_and_gradients():
    grads = []
    for gc in (False, True):
        cfg = StepConfig(batch=2, gradient_checkpointing=gc)
        module = build_module(cfg)
        module.seed_streams("train", 0)
        module.training_step(make_batch(module, cfg), 0).backward()
        grads.append(torch.cat([p.grad.flatten() for p in module.unet.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6, rtol=1e-4)


def test_lora_reference_holds_one_unet():
    full = build_module(StepConfig(lora_rank=0))
    lora = build_module(StepConfig(lora_rank=4))
    assert len(unets(full)) == 2 and full.ref_unet is not None
    assert len(unets(lora)) == 1 and lora.ref_unet is None and lora.use_lora_reference
    est_full, est_lora = (
        static_memory(StepConfig(lora_rank=0)),
        static_memory(StepConfig(lora_rank=4)),
    )
    assert est_full.reference_unet_params == est_full.policy_unet_params
    assert est_lora.reference_unet_params == 0
    assert 0 < est_lora.trainable_params < 0.2 * est_full.trainable_params


def test_cached_latents_skip_the_vae(monkeypatch):
    cfg = StepConfig(batch=2)
    module = build_module(cfg)

    def no_vae(*args, **kwargs):
        raise AssertionError("the VAE encoder ran")

    monkeypatch.setattr(module.vae, "encode", no_vae)
    module.training_step(make_batch(module, cfg), 0)  # cached moments: fine
    pixels = cfg.replace(cached_latents=False)
    with pytest.raises(AssertionError, match="VAE encoder ran"):
        module.training_step(make_batch(module, pixels), 0)


def test_cached_prompt_embeddings_skip_the_text_encoder(monkeypatch):
    cfg = StepConfig(batch=2, preset="tiny-xl")
    module = build_module(cfg)
    # made first: the synthetic cache reads its shapes from the prompt encoder, as a cache writer
    cached, captions = make_batch(module, cfg), make_batch(module, cfg.replace(cached_text=False))

    def no_text(*args, **kwargs):
        raise AssertionError("the text encoder ran")

    monkeypatch.setattr(module.prompt_encoder, "forward", no_text)
    module.training_step(cached, 0)
    with pytest.raises(AssertionError, match="text encoder ran"):
        module.training_step(captions, 0)


@pytest.mark.parametrize("inference", [True, False])
def test_reference_forward_keeps_no_autograd_state(inference):
    cfg = StepConfig(batch=2, reference_inference_mode=inference)
    module = build_module(cfg)
    batch = make_batch(module, cfg)
    outputs = []
    module.ref_unet.register_forward_hook(lambda m, args, out: outputs.append(out.sample))
    latents = module.encode_latents(batch)
    noise, t = module.sample_noise(latents, group=2)
    cond = module.prompt_embeds(batch).repeat(2)
    exclude = [*module.parameters(), *module.buffers()]
    with SavedTensors(exclude) as ref_saved:
        ref = module.unet_errors(latents, noise, t, cond, reference=True)
    with SavedTensors(exclude) as policy_saved:
        policy = module.unet_errors(latents, noise, t, cond)
    assert ref_saved.storages == {} and policy_saved.bytes > 0
    assert ref.grad_fn is None and not ref.requires_grad and policy.grad_fn is not None
    # inference_mode: inference tensors; no_grad: ordinary ones
    assert outputs[0].is_inference() is inference


def test_channels_last_changes_the_weight_layout():
    def conv_weights(module):  # policy and reference
        return [
            m.weight for u in unets(module) for m in u.modules() if isinstance(m, torch.nn.Conv2d)
        ]

    on = build_module(StepConfig(channels_last=True))
    off = build_module(StepConfig(channels_last=False))
    assert all(
        w.is_contiguous(memory_format=torch.channels_last)
        for w in conv_weights(on)
        if w.shape[-1] > 1
    )
    assert not any(
        w.is_contiguous(memory_format=torch.channels_last)
        for w in conv_weights(off)
        if w.shape[-1] > 1
    )


def test_no_fp32_output_leaves_the_last_layer_under_autocast():
    from align.modules.base import Float32Conv2d

    on, off = build_module(StepConfig()), build_module(StepConfig(fp32_output=False))
    assert all(type(u.conv_out) is Float32Conv2d for u in unets(on))
    assert all(type(u.conv_out) is torch.nn.Conv2d for u in unets(off))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the output's dtype says which ran
        for module, dtype in ((on, torch.float32), (off, torch.bfloat16)):
            x = torch.randn(1, 4, 16, 16)
            out = module.unet(x, torch.tensor([10]), encoder_hidden_states=torch.randn(1, 77, 32))
            assert out.sample.dtype == dtype


def test_compile_switch_compiles_the_policy_unet_only():
    on, off = build_module(StepConfig(compile_unet=True)), build_module(StepConfig())
    assert on.unet._compiled_call_impl is not None and off.unet._compiled_call_impl is None
    assert on.ref_unet._compiled_call_impl is None


def test_compile_reference_compiles_the_reference_with_the_mode(monkeypatch):
    calls = []
    real = torch.nn.Module.compile
    monkeypatch.setattr(
        torch.nn.Module, "compile", lambda self, **kw: (calls.append((self, kw)), real(self, **kw))
    )
    module = build_module(
        StepConfig(compile_reference=True, compile_mode="max-autotune-no-cudagraphs")
    )
    assert (
        module.unet._compiled_call_impl is None and module.ref_unet._compiled_call_impl is not None
    )
    assert calls == [(module.ref_unet, {"mode": "max-autotune-no-cudagraphs"})]


def test_an_unknown_compile_mode_fails_when_the_module_is_built():
    with pytest.raises(RuntimeError, match="bogus"):
        build_module(StepConfig(compile_unet=True, compile_mode="bogus"))


@pytest.mark.parametrize("precision,dtype", [("bf16", torch.bfloat16), ("32", torch.float32)])
def test_bf16_autocast_runs_the_unet_in_bf16(precision, dtype):
    cfg = StepConfig(batch=1, precision=precision)
    module = build_module(cfg)
    seen = []
    module.unet.conv_in.register_forward_hook(lambda m, args, out: seen.append(out.dtype))
    loss = BareStep(module, cfg)(make_batch(module, cfg), 0)
    assert seen == [dtype] and loss.dtype == torch.float32  # errors and loss stay float32


def test_attention_goes_through_torch_sdpa(monkeypatch):
    cfg = StepConfig(batch=1)
    module = build_module(cfg)
    processors = {type(p).__name__ for p in module.unet.attn_processors.values()}
    assert processors == {"AttnProcessor2_0"}
    calls = []
    original = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    module.training_step(make_batch(module, cfg), 0)
    assert len(calls) > 0


@pytest.mark.parametrize(
    "name,check",
    [
        ("adamw-fused", lambda opt: opt.defaults["fused"] is True),
        ("adafactor", lambda opt: type(opt).__name__ == "Adafactor"),
        ("adamw", lambda opt: type(opt) is torch.optim.AdamW and not opt.defaults["fused"]),
    ],
)
def test_optimizer_switch_steps_the_trainable_weights(name, check):
    cfg = StepConfig(batch=1, optimizer=name, lr=1e-3)
    module = build_module(cfg)
    step = BareStep(module, cfg)
    assert check(step.optimizer)
    before = [p.detach().clone() for p in step.params]
    step(make_batch(module, cfg), 0)
    assert any(not torch.equal(a, b) for a, b in zip(before, step.params))


def test_fused_adamw_is_clipped_under_bf16_mixed(monkeypatch):
    """Lightning's bf16-mixed plugin raises on clipping with a fused optimizer;
    the module clips itself."""
    import lightning as L

    from align.bench.runner import _loader

    norms = []
    clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(
        torch.nn.utils,
        "clip_grad_norm_",
        lambda p, m, *a, **k: norms.append(m) or clip(p, m, *a, **k),
    )
    cfg = StepConfig(batch=1, optimizer="adamw-fused", lr=1e-3)
    module = build_module(cfg)
    before = [p.detach().clone() for p in module.unet.parameters()]
    trainer = L.Trainer(
        accelerator="cpu",
        precision="bf16-mixed",
        gradient_clip_val=0.5,
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, train_dataloaders=_loader(make_batch(module, cfg), 2))
    assert norms == [0.5, 0.5]
    assert any(not torch.equal(a, b) for a, b in zip(before, module.unet.parameters()))


def test_fsdp_clips_through_the_root_fsdp_module(monkeypatch):
    """Under FSDP the norm is over every rank's shard: the root FSDP module's clip_grad_norm_
    (Lightning's FSDP plugin raises on norm clipping). Lightning runs FSDP on CUDA only, so the
    dispatch is checked with stubs."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    calls, logged = [], {}
    module = build_module(StepConfig(batch=1))
    root = SimpleNamespace(
        clip_grad_norm_=lambda max_norm: calls.append(max_norm) or torch.tensor(3.0)
    )
    trainer = SimpleNamespace(
        strategy=FSDPStrategy(), model=root, precision_plugin=SimpleNamespace(scaler=None)
    )
    module._trainer = trainer
    monkeypatch.setattr(type(module), "trainer", property(lambda self: trainer))
    monkeypatch.setattr(module, "log", lambda name, value, **kw: logged.__setitem__(name, value))
    monkeypatch.setattr(
        torch.nn.utils, "clip_grad_norm_", lambda *a, **k: pytest.fail("per-shard clipping")
    )
    optimizer = module.configure_optimizers()
    # a shard's norm is not the gradient norm: not logged here
    module.on_before_optimizer_step(optimizer)
    assert logged == {}
    module.configure_gradient_clipping(optimizer, 1.0, "norm")
    assert calls == [1.0] and float(logged["train/grad_norm"]) == 3.0  # FSDP's total norm
    module.configure_gradient_clipping(optimizer, None, "norm")  # no clipping asked: nothing called
    assert calls == [1.0]


def test_logged_grad_norm_is_the_total_norm(monkeypatch):
    cfg = StepConfig(batch=1)
    module = build_module(cfg)
    module.training_step(make_batch(module, cfg), 0).backward()
    logged = {}
    monkeypatch.setattr(module, "log", lambda name, value, **kw: logged.__setitem__(name, value))
    module.on_before_optimizer_step(None)
    by_hand = (
        sum(
            float((p.grad.double() ** 2).sum())
            for p in module.unet.parameters()
            if p.grad is not None
        )
        ** 0.5
    )
    assert float(logged["train/grad_norm"]) == pytest.approx(by_hand, rel=1e-5)


def test_8bit_adamw_is_optional():
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        module = build_module(StepConfig(optimizer="adamw8bit"))  # building needs no bitsandbytes
        with pytest.raises(MissingExtra, match=r"bitsandbytes.*align\[8bit\]"):
            module.configure_optimizers()
    else:
        pytest.skip("bitsandbytes is installed: its 8-bit AdamW needs CUDA, not tested here")


def test_logit_noise_measures_each_precision_against_float64():
    from align.bench.precision import logit_noise

    noise = logit_noise("tiny", pairs=2)
    assert noise["fp32"] < 0.01 < noise["bf16"] and all(v == v for v in noise.values())
