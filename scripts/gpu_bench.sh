#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md, measured in one go on a CUDA machine, from the repository root.
#
#   scripts/gpu_bench.sh core  [OUTDIR]   speed (SD1.5 DPO/KTO) and memory (SD1.5 1 pair, SDXL 2 pairs at 1024 px)
#   scripts/gpu_bench.sh extra [OUTDIR]   profiles of the SD1.5 step; switches: larger batch, compile +
#                                         channels-last + fused AdamW, LoRA, 8-bit AdamW; and a real
#                                         `align fit` of the tiny preset in bf16 on the GPU
#   scripts/gpu_bench.sh fast  [OUTDIR]   SD1.5 DPO at 16 pairs with every speed switch, without and with compile
#   scripts/gpu_bench.sh compile [OUTDIR] the reference UNet compiled too, at 16 and 24 pairs (fits one 10-minute call)
#   scripts/gpu_bench.sh graphs  [OUTDIR] the same at 16 pairs with CUDA graphs (compile mode reduce-overhead)
#   scripts/gpu_bench.sh goals [OUTDIR]   the GPU-speed goals in order (8 min on an H200): SD1.5 DPO at 32 pairs
#                                         with every switch, Lightning vs bare; the same with both UNets
#                                         compiled; the VAE and text encoders in the step; the float32
#                                         output layer's cost
#   scripts/gpu_bench.sh flow [OUTDIR]    SDXL full DPO at 1024 px, 16 pairs; SD3.5 Medium and FLUX.1 dev
#                                         LoRA-32 DPO and SD3.5 full DPO, 1 pair, 1024 px: beside the
#                                         meta-device estimates
#   scripts/gpu_bench.sh flux [OUTDIR]    FLUX.1 dev LoRA-32 DPO at 1024 and 512 px, and with float32
#                                         frozen weights; SD3.5 Medium LoRA-32 again
#
# Every `align bench` row is appended to OUTDIR/bench.jsonl (default reports/gpu); the whole log goes to
# OUTDIR/log.txt; a summary table of every row is printed last. Each command has its own time limit, so one
# that fails (out of memory, say) does not stop the others. PYTHON (default python3) and ALIGN (default
# `$PYTHON -m align.cli`, which needs only the repository on PYTHONPATH) say how Python and align are called;
# `make bench-gpu PART=...` sets both to the project's .venv. BUDGET_S (seconds, default none) ends the
# part by then: each command's limit is cut to the time left, and a command with under 20 s left is skipped.
set -u
PART=${1:-core}
OUTDIR=${2:-reports/gpu}
mkdir -p "$OUTDIR"
PY=${PYTHON:-python3}
ALIGN=${ALIGN:-$PY -m align.cli}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if ! $PY -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "gpu_bench.sh: torch sees no CUDA device here; this script measures a GPU (make bench runs the CPU figures)" >&2
  exit 2
fi

if ! $PY -c "import align.cli, align.bench.runner, diffusers, jsonargparse, webdataset" 2>"$OUTDIR/import.txt"; then
  cat "$OUTDIR/import.txt" >&2
  echo "gpu_bench.sh: align or a package it needs does not import (above)" >&2
  exit 3
fi
DEADLINE=$(( $(date +%s) + ${BUDGET_S:-1000000} ))

run() {  # run LIMIT_S ARGS...: one command, logged, time-limited; failures are logged, not fatal
  local limit=$1; shift
  local left=$(( DEADLINE - $(date +%s) ))
  (( left < limit )) && limit=$left
  if (( limit < 20 )); then echo "### skipped, BUDGET_S spent: $*" | tee -a "$OUTDIR/log.txt"; return; fi
  echo "### $(date -u +%H:%M:%S) $*" | tee -a "$OUTDIR/log.txt"
  timeout "$limit" "$@" >>"$OUTDIR/log.txt" 2>&1
  local rc=$?
  tail -n 6 "$OUTDIR/log.txt" | grep -v '^###' | sed 's/^/    /'
  echo "    -> exit $rc" | tee -a "$OUTDIR/log.txt"
}
bench() { local limit=$1; shift; run "$limit" $ALIGN bench --device cuda --json "$OUTDIR/bench.jsonl" "$@"; }

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  $PY -c "import torch, lightning, diffusers, transformers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| lightning', lightning.__version__, '| diffusers', diffusers.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__)"
} 2>&1 | tee -a "$OUTDIR/log.txt"

case "$PART" in
core)
  # most important first: a command cut off by the caller's time limit loses the least
  # speed: SD1.5 architecture, 512 px, bf16 (auto on CUDA), cached latents and embeddings; Lightning vs bare
  bench 150 --objective dpo --preset sd15-arch --batch 4 --steps 20 --compare-bare
  # memory: SD1.5 full DPO, 1 pair (goal: under 24 GB); SDXL full DPO, 2 pairs, 1024 px (goal: fits 80 GB)
  bench 90 --objective dpo --preset sd15-arch --batch 1 --steps 10
  bench 150 --objective dpo --preset sdxl-arch --batch 2 --steps 5 --warmup 2 --gradient-checkpointing
  bench 150 --objective dpo --preset sdxl-arch --batch 2 --steps 5 --warmup 2 --gradient-checkpointing --optimizer adafactor
  bench 150 --objective dpo --preset sdxl-arch --batch 2 --steps 5 --warmup 2 --gradient-checkpointing --frozen-dtype bf16
  bench 120 --objective dpo --preset sd15-arch --batch 8 --steps 20
  bench 120 --objective kto --preset sd15-arch --batch 8 --steps 20
  ;;
extra)
  # where the SD1.5 step's time goes (GPU kernel time vs wall, launches, host-device syncs), bare and Lightning
  run 90 $PY scripts/profile_step.py --preset sd15-arch --batch 4 --mode bare
  run 90 $PY scripts/profile_step.py --preset sd15-arch --batch 4 --mode lightning
  bench 90 --objective dpo --preset sd15-arch --batch 16 --steps 10
  bench 240 --objective dpo --preset sd15-arch --batch 8 --steps 10 --warmup 4 --channels-last --compile --optimizer adamw-fused
  bench 90 --objective dpo --preset sd15-arch --batch 4 --steps 20 --lora-rank 64
  # a real training run on the GPU: synthetic shards, the tiny preset, bf16-mixed, CSV logs only
  WORK=$(mktemp -d)  # shards, checkpoints and exports stay out of OUTDIR
  run 60 $ALIGN data synthetic pickapic --out "$WORK/synthetic"
  cat >"$WORK/gpu_overlay.yaml" <<EOF
trainer:
  accelerator: gpu
  precision: bf16-mixed
  default_root_dir: $WORK/fit
  logger:
    - class_path: lightning.pytorch.loggers.CSVLogger
      init_args: {save_dir: $WORK/fit, name: csv}
data:
  init_args: {train_shards: $WORK/synthetic, val_shards: $WORK/synthetic/pairs-000000.tar}
EOF
  run 120 $ALIGN fit --config configs/dpo/tiny.yaml --config "$WORK/gpu_overlay.yaml"
  cp "$WORK"/fit/csv/version_0/metrics.csv "$OUTDIR/fit_metrics.csv" 2>/dev/null
  bench 90 --objective dpo --preset sd15-arch --batch 4 --steps 20 --optimizer adamw8bit  # needs bitsandbytes
  ;;
fast)
  # the SD1.5 step with every speed switch: channels-last (policy and reference), fused AdamW, frozen parts in
  # bf16 (no per-op casts of the reference's weights), then + torch.compile of the policy UNet
  bench 120 --objective dpo --preset sd15-arch --batch 16 --steps 10 --channels-last --optimizer adamw-fused --frozen-dtype bf16
  bench 300 --objective dpo --preset sd15-arch --batch 16 --steps 10 --warmup 4 --channels-last --compile --optimizer adamw-fused --frozen-dtype bf16
  ;;
compile)
  # the reference's forward (a quarter of the step's FLOPs) compiled as well; then 24 pairs, which the compiled
  # step's smaller activations leave room for (16 pairs compiled: 42.8 GiB)
  bench 330 --objective dpo --preset sd15-arch --batch 16 --steps 10 --warmup 4 --channels-last --optimizer adamw-fused --frozen-dtype bf16 --compile --compile-reference
  bench 240 --objective dpo --preset sd15-arch --batch 24 --steps 10 --warmup 4 --channels-last --optimizer adamw-fused --frozen-dtype bf16 --compile --compile-reference
  ;;
graphs)
  bench 540 --objective dpo --preset sd15-arch --steps 10 --warmup 6 --channels-last --optimizer adamw-fused --frozen-dtype bf16 --compile --compile-reference --batch 16 --compile-mode reduce-overhead
  ;;
goals)
  # most important first; the limits add up to 7.5 minutes. 32 pairs: the largest batch of the H100's
  # 16 with room on a 141 GB GPU (16 pairs uncompiled peaked at 57.8 GiB)
  bench 100 --objective dpo --preset sd15-arch --batch 32 --steps 6 --warmup 3 --channels-last --optimizer adamw-fused --frozen-dtype bf16 --compare-bare
  bench 230 --objective dpo --preset sd15-arch --batch 32 --steps 6 --warmup 3 --channels-last --optimizer adamw-fused --frozen-dtype bf16 --compile --compile-reference
  bench 70 --objective dpo --preset sd15-arch --batch 32 --steps 5 --warmup 2 --channels-last --optimizer adamw-fused --frozen-dtype bf16 --pixels --captions
  bench 60 --objective dpo --preset sd15-arch --batch 32 --steps 5 --warmup 2 --channels-last --optimizer adamw-fused --frozen-dtype bf16 --no-fp32-output
  ;;
flow)
  # SDXL at a micro-batch the meta-device estimate fits in 141 GB (16 pairs: 72-100 GiB)
  bench 100 --objective dpo --preset sdxl-arch --batch 16 --steps 3 --warmup 1 --gradient-checkpointing --frozen-dtype bf16 --optimizer adamw-fused
  bench 70 --objective dpo --preset sd35-arch --batch 1 --steps 4 --warmup 2 --gradient-checkpointing --frozen-dtype bf16 --lora-rank 32
  bench 100 --objective dpo --preset flux-arch --batch 1 --steps 4 --warmup 2 --gradient-checkpointing --frozen-dtype bf16 --lora-rank 32
  bench 80 --objective dpo --preset sd35-arch --batch 1 --steps 4 --warmup 2 --gradient-checkpointing --frozen-dtype bf16
  ;;
flux)
  # FLUX.1 dev LoRA DPO, 1 pair: checkpointing and bf16 frozen weights at 1024 and 512 px, then
  # float32 frozen weights; SD3.5 Medium LoRA-32 once more (its step time varied between runs).
  # The module switches cuDNN attention off for FLUX (its backward fails there): the diagnosis
  # (synchronous kernels, cuDNN off by hand) is this part at commit 964e42f
  bench 100 --objective dpo --preset flux-arch --batch 1 --steps 4 --warmup 2 --gradient-checkpointing --frozen-dtype bf16 --lora-rank 32
  bench 80 --objective dpo --preset flux-arch --batch 1 --steps 4 --warmup 2 --gradient-checkpointing --frozen-dtype bf16 --lora-rank 32 --resolution 512
  bench 110 --objective dpo --preset flux-arch --batch 1 --steps 4 --warmup 2 --gradient-checkpointing --lora-rank 32
  bench 60 --objective dpo --preset sd35-arch --batch 1 --steps 4 --warmup 2 --gradient-checkpointing --frozen-dtype bf16 --lora-rank 32
  ;;
*) echo "usage: $0 core|extra|fast|compile|graphs|goals|flow|flux [OUTDIR]" >&2; exit 2 ;;
esac

$PY - "$OUTDIR/bench.jsonl" <<'EOF'
import json, sys
from align.bench.report import format_table
try:
    rows = [json.loads(line) for line in open(sys.argv[1])]
except FileNotFoundError:
    sys.exit("no bench rows were written")
print(format_table(rows))
for r in rows:
    print(f"{r['objective']} {r['preset']} b{r['batch']} {r['mode']}: median {1000 * r['median_step_s']:.1f} ms, "
          f"{r['achieved_tflops']:.1f} of {r['peak_tflops']:.0f} TFLOP/s ({100 * r['frac_of_peak']:.1f}%), "
          f"peak {r['peak_mem_mb'] / 1024:.2f} GiB, lora {r['lora_rank']} ckpt {r['gradient_checkpointing']} "
          f"frozen {r['frozen_dtype']} opt {r['optimizer']} compile {r['compile_unet']}")
EOF
