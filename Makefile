# align — every entry point a user needs. `make help` lists them.
# Each target installs what it needs into .venv (created once): align alone for training, the extras of
# setup.cfg it uses for the rest, pinned by constraints.txt. An install reruns only when setup.cfg,
# pyproject.toml or constraints.txt change.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# one stamp per set of extras: .installed-core (pip install -e .), .installed-eval+rewards
# (pip install -e ".[eval,rewards]"), ...
STAMP  := $(VENV)/.installed-core
DEV_STAMP  := $(VENV)/.installed-dev
EVAL_STAMP := $(VENV)/.installed-eval+rewards
DEMO_STAMP := $(VENV)/.installed-demo
GPU_STAMP  := $(VENV)/.installed-8bit
comma  := ,
ALIGN  := $(BIN)/align
SYNTH  := data/synthetic/pickapic
SYNTH_KTO := data/synthetic/kto
SYNTH_LONG := data/synthetic/longcaption
SYNTH_LONGPAIRS := data/synthetic/longpairs
TINY_DENSCORE := data/synthetic/tiny-denscore
ARGS   ?=

.DEFAULT_GOAL := help
.PHONY: help install data-synthetic train-dpo train-kto train-longalign-sft train-sft-winners train-denscore train-longalign-rft train-grpo train-online-dpo train-online-kto test test-all bench bench-gpu eval demo clean

help: ## list the targets
	@grep -hE '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-22s %s\n", $$1, $$2}'
	@echo "  CONFIG=<yaml> picks the set-up for train-* targets (default: the embedded tiny CPU run);"
	@echo "  ARGS='--trainer.max_steps 10' passes extra LightningCLI flags."

$(VENV)/.installed-%: setup.cfg pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".$(if $(filter core,$*),,[$(subst +,$(comma),$*)])"
	touch $@

install: $(DEV_STAMP) ## create .venv and install align with its dev extras (what `make test` needs)

$(SYNTH)/pairs-000003.tar: | $(STAMP)
	$(ALIGN) data synthetic pickapic --out $(SYNTH)

data-synthetic: $(SYNTH)/pairs-000003.tar ## write the synthetic Pick-a-Pic shards the embedded default trains on

$(SYNTH_KTO)/singles-000003.tar: | $(STAMP)
	$(ALIGN) data synthetic kto --out $(SYNTH_KTO)

train-dpo: CONFIG ?= configs/dpo/tiny.yaml
train-dpo: $(STAMP) ## Diffusion-DPO (default: tiny model, synthetic pairs, CPU; CONFIG=configs/dpo/sd15.yaml for the paper)
	@if [ "$(CONFIG)" = "configs/dpo/tiny.yaml" ]; then $(MAKE) --no-print-directory data-synthetic; fi
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(ALIGN) fit --config $(CONFIG) $(ARGS)

train-kto: CONFIG ?= configs/kto/tiny.yaml
train-kto: $(STAMP) ## Diffusion-KTO (default: tiny model, synthetic labelled images, CPU; CONFIG=configs/kto/sd15.yaml for the paper)
	@if [ "$(CONFIG)" = "configs/kto/tiny.yaml" ]; then $(MAKE) --no-print-directory $(SYNTH_KTO)/singles-000003.tar; fi
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(ALIGN) fit --config $(CONFIG) $(ARGS)

# One BLAS thread per test worker: two workers share the two cores instead of fighting over them.
$(SYNTH_LONG)/longcaption-000003.tar: | $(STAMP)
	$(ALIGN) data synthetic longcaption --out $(SYNTH_LONG)

$(SYNTH_LONGPAIRS)/longpairs-000003.tar: | $(STAMP)
	$(ALIGN) data synthetic longpairs --out $(SYNTH_LONGPAIRS)

$(TINY_DENSCORE)/.complete: | $(STAMP)
	$(ALIGN) data tiny-denscore $(TINY_DENSCORE)

train-longalign-sft: CONFIG ?= configs/longalign/sft_tiny.yaml
train-longalign-sft: $(STAMP) ## LongAlign SFT with segment encoding of long prompts (default: tiny, synthetic long captions; CONFIG=configs/longalign/sft_sd15.yaml)
	@if [ "$(CONFIG)" = "configs/longalign/sft_tiny.yaml" ]; then $(MAKE) --no-print-directory $(SYNTH_LONG)/longcaption-000003.tar; fi
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(ALIGN) fit --config $(CONFIG) $(ARGS)

train-sft-winners: CONFIG ?= configs/sft/winners_tiny.yaml
train-sft-winners: $(STAMP) ## SFT on the preferred image of each pair, the DPO/KTO papers' SFT baseline (default: tiny; CONFIG=configs/sft/winners_sd15.yaml)
	@if [ "$(CONFIG)" = "configs/sft/winners_tiny.yaml" ]; then $(MAKE) --no-print-directory data-synthetic; fi
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(ALIGN) fit --config $(CONFIG) $(ARGS)

train-denscore: CONFIG ?= configs/longalign/denscore_tiny.yaml
train-denscore: $(STAMP) ## Denscore segment-level preference model (default: tiny CLIP, synthetic long-caption pairs; CONFIG=configs/longalign/denscore_clip_h.yaml)
	@if [ "$(CONFIG)" = "configs/longalign/denscore_tiny.yaml" ]; then $(MAKE) --no-print-directory $(SYNTH_LONGPAIRS)/longpairs-000003.tar; fi
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(ALIGN) fit --config $(CONFIG) $(ARGS)

train-longalign-rft: CONFIG ?= configs/longalign/rft_tiny.yaml
train-longalign-rft: $(STAMP) ## LongAlign reward fine-tuning (default: tiny model + tiny Denscore, synthetic prompts; CONFIG=configs/longalign/rft_sd15.yaml)
	@if [ "$(CONFIG)" = "configs/longalign/rft_tiny.yaml" ]; then $(MAKE) --no-print-directory $(SYNTH_LONG)/longcaption-000003.tar $(TINY_DENSCORE)/.complete; fi
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(ALIGN) fit --config $(CONFIG) $(ARGS)

train-grpo: CONFIG ?= configs/grpo/tiny.yaml
train-grpo: $(STAMP) ## GRPO on the model's own samples (default: tiny model, JPEG compressibility, CPU; the monitor's gold: a tiny CLIP)
	@if [ "$(CONFIG)" = "configs/grpo/tiny.yaml" ]; then $(MAKE) --no-print-directory $(TINY_REWARDS)/imagereward/.complete; fi
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(ALIGN) fit --config $(CONFIG) $(ARGS)

train-online-dpo: CONFIG ?= configs/online/dpo_tiny.yaml
train-online-dpo: $(STAMP) ## iterative online DPO: each round the policy's own pairs, scored by a reward (default: tiny, JPEG compressibility, CPU)
	@if [ "$(CONFIG)" = "configs/online/dpo_tiny.yaml" ]; then $(MAKE) --no-print-directory $(TINY_REWARDS)/imagereward/.complete; fi
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(ALIGN) fit --config $(CONFIG) $(ARGS)

train-online-kto: CONFIG ?= configs/online/kto_tiny.yaml
train-online-kto: $(STAMP) ## iterative online KTO (default: tiny, JPEG compressibility, CPU)
	@if [ "$(CONFIG)" = "configs/online/kto_tiny.yaml" ]; then $(MAKE) --no-print-directory $(TINY_REWARDS)/imagereward/.complete; fi
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(ALIGN) fit --config $(CONFIG) $(ARGS)

test: $(DEV_STAMP) ## lint (ruff: lines <= 100, pyflakes) + the fast suite (CPU, tiny models; no slow cases)
	$(BIN)/ruff check align tests
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n 2 -q

test-all: $(DEV_STAMP) ## lint + every test, the slow ones too
	$(BIN)/ruff check align tests
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n 2 -q -m "slow or not slow"

demo: $(DEMO_STAMP) ## shapes-world demo: base, judge-made data, DPO/KTO/LongAlign SFT/RFT + controls x 3 seeds, judged report in reports/, ~28 min from scratch, ~19 with the base cached (QUICK=1: a smaller base, 1 seed, fewer steps)
	$(ALIGN) demo $(if $(QUICK),--quick --out reports/quick,--out reports) $(ARGS)

bench: $(STAMP) ## benchmarks on this machine: Lightning vs a bare loop (tiny), FLOPs of SD1.5/SDXL DPO and KTO steps (meta device)
	$(ALIGN) bench --objective dpo kto --preset tiny --batch 4 --steps 20 --compare-bare --threads 1 $(ARGS)
	$(ALIGN) bench --objective dpo kto --preset sd15-arch sdxl-arch --batch 1 --flops-only

bench-gpu: $(GPU_STAMP) ## on a CUDA machine: the GPU figures of docs/benchmarks.md (PART=goals|flow|flux|core|extra|fast|compile|graphs; rows to reports/gpu)
	PYTHON=$(BIN)/python ALIGN=$(ALIGN) bash scripts/gpu_bench.sh $(or $(PART),core) reports/gpu

# ---- evaluation: sample the newest tiny DPO export and the tiny base, score both, win rates, FID ----------
EVAL_CHECKPOINT ?=
EVAL_BASE       ?= tiny
EVAL_PROMPTS    ?= configs/eval/prompts-tiny.txt
EVAL_OUT        ?= artifacts/eval
# FID compares samples with real images: the synthetic validation shard the tiny model trains against
EVAL_FID_REFERENCE ?= $(SYNTH)/pairs-000000.tar
TINY_REWARDS    := artifacts/tiny-rewards

$(TINY_REWARDS)/imagereward/.complete: | $(EVAL_STAMP)
	$(ALIGN) data tiny-rewards $(TINY_REWARDS)

eval: $(EVAL_STAMP) $(TINY_REWARDS)/imagereward/.complete ## sample + score a tiny DPO export vs the tiny base (EVAL_CHECKPOINT=<export> to choose; trains one if none)
	@ckpt="$(EVAL_CHECKPOINT)"; \
	if [ -z "$$ckpt" ]; then ckpt=$$(ls -td logs/align-dpo/*/export/final 2>/dev/null | head -1); fi; \
	if [ -z "$$ckpt" ]; then $(MAKE) --no-print-directory train-dpo && ckpt=$$(ls -td logs/align-dpo/*/export/final | head -1); fi; \
	echo "evaluating $$ckpt against $(EVAL_BASE)"; \
	if [ "$(EVAL_FID_REFERENCE)" = "$(SYNTH)/pairs-000000.tar" ]; then $(MAKE) --no-print-directory data-synthetic; fi && \
	$(ALIGN) sample --checkpoint $$ckpt --prompts $(EVAL_PROMPTS) --out $(EVAL_OUT)/run -n 2 --steps 10 --device cpu && \
	$(ALIGN) sample --checkpoint $(EVAL_BASE) --prompts $(EVAL_PROMPTS) --out $(EVAL_OUT)/base -n 2 --steps 10 --device cpu && \
	$(ALIGN) eval --images $(EVAL_OUT)/run --baseline $(EVAL_OUT)/base --reward-root $(TINY_REWARDS) \
	  --fid-reference $(EVAL_FID_REFERENCE) --fid-features clip:$(TINY_REWARDS)/clip --out $(EVAL_OUT)/report --device cpu

clean: ## remove logs, reports and generated data (keeps .venv)
	rm -rf logs reports artifacts data/synthetic
