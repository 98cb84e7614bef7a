# SteerLM: train, convert and serve attribute-steerable language models.
# `make demo` runs the whole method on CPU; `make test` runs the test suite. Both set themselves up.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# serve / query
MODEL ?= runs/tiny
# RM is the reward model directory here, but make predefines RM = rm -f: drop that default.
ifeq ($(origin RM),default)
RM :=
endif
BACKEND ?= cpu
DEVICE ?=
ENGINE_DIR ?=
TP ?= 1
HTTP_PORT ?= 8000
GRPC_PORT ?= 8001
METRICS_PORT ?= 8002
API_PORT ?= 8080
# engine (docs/build.md)
DTYPE ?= bfloat16
GPU ?= h100
OUT ?=
PLAN ?=
ENGINE ?= llmapi
MAX_BATCH ?=

SOAK_REQUESTS ?= 5000

.PHONY: setup test soak serve demo eval engine tiny lock clean help

help:
	@echo "make setup                 create .venv with everything a CPU machine needs (pinned)"
	@echo "make demo                  the whole SteerLM method on CPU in ~10 minutes"
	@echo "make test                  run the test suite"
	@echo "make tiny                  write a tiny random SteerLM checkpoint to runs/tiny"
	@echo "make serve MODEL=DIR [RM=DIR] [BACKEND=cpu|torch|trtllm DEVICE=cuda ENGINE_DIR=DIR TP=N] [HTTP_PORT= GRPC_PORT= METRICS_PORT= API_PORT=] [TRITON_MODEL_NAME=NAME]"
	@echo "make soak [SOAK_REQUESTS=5000]   serving: long mixed load (0 lost) and client cancellation, measured"
	@echo "make engine MODEL=DIR TP=N DTYPE=bfloat16|float16|fp8 GPU=a100-40|a100-80|h100|h200 [OUT=DIR] [PLAN=1] [ENGINE=legacy] [MAX_BATCH=N]"
	@echo "make eval MODEL=DIR RM=DIR"
	@echo "make prepare DATA_IN='a.csv b.jsonl' [DATA_DIR=runs/data]   public data -> conversation JSONL + split"
	@echo "make train-rm | annotate | train-sft | bootstrap [BASE= RM_DIR= SFT_DIR= NPROC=N TRAIN_ARGS=...]"

setup: $(STAMP)

$(STAMP): requirements.lock requirements-nodeps.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.lock
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Re-resolve requirements.in into requirements.lock (needs network access to the package index).
lock:
	rm -rf /tmp/steerlm-lock && $(PYTHON) -m venv /tmp/steerlm-lock
	/tmp/steerlm-lock/bin/pip install -q -r requirements.in
	/tmp/steerlm-lock/bin/pip freeze | grep -v '^-e' > requirements.lock

test: $(STAMP)
	$(PY) -m pytest -q tests

soak: $(STAMP)
	SOAK_REQUESTS=$(SOAK_REQUESTS) $(PY) -m pytest -q -s tests/serving/soak_load.py

tiny: $(STAMP)
	$(PY) -m steer_train init-tiny --out runs/tiny

serve: $(STAMP)
	$(PY) -m steerlm.serve --model $(MODEL) $(if $(RM),--reward-model $(RM)) --backend $(BACKEND) \
		$(if $(DEVICE),--device $(DEVICE)) $(if $(ENGINE_DIR),--engine-dir $(ENGINE_DIR)) --tp $(TP) \
		--http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT) --metrics-port $(METRICS_PORT) --api-port $(API_PORT) \
		$(if $(TRITON_MODEL_NAME),--triton-model-name '$(TRITON_MODEL_NAME)')

engine: $(STAMP)
	$(PY) build/build_engine.py --model_dir $(MODEL) --tp_size $(TP) --dtype $(DTYPE) --gpu $(GPU) \
		--engine $(ENGINE) $(if $(OUT),--output_dir $(OUT)) $(if $(PLAN),--plan_only) \
		$(if $(MAX_BATCH),--max_batch_size $(MAX_BATCH))

eval: $(STAMP)
	$(PY) -m steer_train eval --model $(MODEL) --reward-model $(RM)

demo: $(STAMP)
	$(PY) -m steer_train demo

clean:
	rm -rf runs

# training (steer_train; docs/training.md). NPROC=N runs rm/sft under torchrun with N processes.
DATA_IN ?=
DATA_DIR ?= runs/data
BASE ?= runs/tiny
RM_DIR ?= runs/rm
SFT_DIR ?= runs/sft
NPROC ?=
TRAIN_ARGS ?=
TRAIN_PY = $(if $(NPROC),$(PY) -m torch.distributed.run --standalone --nproc_per_node $(NPROC),$(PY))

.PHONY: prepare train-rm annotate train-sft bootstrap

prepare: $(STAMP)
	$(PY) -m steer_train prepare $(foreach f,$(DATA_IN),--input $(f)) --out $(DATA_DIR)

train-rm: $(STAMP)
	$(TRAIN_PY) -m steer_train rm --model $(BASE) --data $(DATA_DIR)/train.jsonl --val-data $(DATA_DIR)/val.jsonl \
		--out $(RM_DIR) $(TRAIN_ARGS)

annotate: $(STAMP)
	$(PY) -m steer_train annotate --input $(DATA_DIR)/train.jsonl --reward-model $(RM_DIR) \
		--out $(DATA_DIR)/train.annotated.jsonl

train-sft: $(STAMP)
	$(TRAIN_PY) -m steer_train sft --model $(BASE) --data $(DATA_DIR)/train.annotated.jsonl \
		--val-data $(DATA_DIR)/val.jsonl --out $(SFT_DIR) $(TRAIN_ARGS)

bootstrap: $(STAMP)
	$(PY) -m steer_train bootstrap --model $(SFT_DIR) --reward-model $(RM_DIR) --prompts $(DATA_DIR)/val.jsonl \
		--out $(SFT_DIR)-bootstrap $(TRAIN_ARGS)
