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

.PHONY: setup test lint soak serve demo eval engine tiny lock clean help bench bench-compare

help:
	@echo "make setup                 create .venv with everything a CPU machine needs (pinned)"
	@echo "make demo                  the whole SteerLM method on CPU in ~10 minutes"
	@echo "make test                  lint, then run the test suite"
	@echo "make lint                  ruff (rules in pyproject.toml)"
	@echo "make tiny                  write a tiny random SteerLM checkpoint to runs/tiny"
	@echo "make serve MODEL=DIR [RM=DIR] [BACKEND=cpu|torch|trtllm DEVICE=cuda ENGINE_DIR=DIR TP=N] [HTTP_PORT= GRPC_PORT= METRICS_PORT= API_PORT=] [TRITON_MODEL_NAME=NAME]"
	@echo "make soak [SOAK_REQUESTS=5000]   serving load + cancellation; bad inputs, injections, faults (counts)"
	@echo "make engine MODEL=DIR TP=N DTYPE=bfloat16|float16|fp8 GPU=a100-40|a100-80|h100|h200 [OUT=DIR] [PLAN=1] [ENGINE=legacy] [MAX_BATCH=N]"
	@echo "make eval MODEL=DIR RM=DIR"
	@echo "make prepare DATA_IN='a.csv b.jsonl' [DATA_DIR=runs/data]   public data -> conversation JSONL + split"
	@echo "make train-rm | annotate | train-sft | bootstrap [BASE= RM_DIR= SFT_DIR= NPROC=N TRAIN_ARGS=...]"
	@echo "make bench [BENCH_OUT=DIR]  serving, batching, conversion, training benchmarks -> bench/results.json, BENCHMARKS.md"
	@echo "make bench-compare         a new run into runs/bench, compared with bench/results.json (exit 1 on regressions)"

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

test: lint
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .

soak: $(STAMP)
	SOAK_REQUESTS=$(SOAK_REQUESTS) $(PY) -m pytest -q -s tests/serving/soak_load.py
	$(PY) -m pytest -q -s tests/soak/soak_all.py

tiny: $(STAMP)
	$(PY) -m steer_train init-tiny --out runs/tiny

# BACKEND=trtllm runs in NVIDIA's container with its own python (TensorRT-LLM, CUDA torch), not .venv;
# TP reaches the server only when given (else the engine's extra_llm_api_options.yaml decides).
TRTLLM := $(filter trtllm,$(BACKEND))
serve: $(if $(TRTLLM),,$(STAMP))
	$(if $(TRTLLM),PYTHONPATH=$(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH)) $(PYTHON),$(PY)) -m steerlm.serve \
		--model $(MODEL) $(if $(RM),--reward-model $(RM)) --backend $(BACKEND) \
		$(if $(DEVICE),--device $(DEVICE)) $(if $(ENGINE_DIR),--engine-dir $(ENGINE_DIR)) $(if $(filter-out file,$(origin TP)),--tp $(TP)) \
		--http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT) --metrics-port $(METRICS_PORT) \
		--api-port $(API_PORT) \
		$(if $(TRITON_MODEL_NAME),--triton-model-name '$(TRITON_MODEL_NAME)')

engine: $(STAMP)
	$(PY) build/build_engine.py --model_dir $(MODEL) --tp_size $(TP) --dtype $(DTYPE) --gpu $(GPU) \
		--engine $(ENGINE) $(if $(OUT),--output_dir $(OUT)) $(if $(PLAN),--plan_only) \
		$(if $(MAX_BATCH),--max_batch_size $(MAX_BATCH))

eval: $(STAMP)
	$(PY) -m steer_eval eval --model $(MODEL) --reward-model $(RM)

demo: $(STAMP)
	$(PY) -m steer_eval demo

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

# benchmarks (BENCHMARKS.md). BENCH_OUT=DIR writes DIR/results.json and DIR/BENCHMARKS.md instead of the recorded
# ones; the sizes below keep the four scripts within ~15 minutes on 2 idle cores. bench/gpu.py is run by hand.
BENCH_OUT ?=
BENCH_VENV := .venv-bench
BENCH_STAMP := $(VENV)/.bench-installed
BENCH_TO = $(if $(BENCH_OUT),--out $(BENCH_OUT))

$(BENCH_STAMP): $(STAMP) requirements-bench.txt
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-bench.txt
	touch $(BENCH_STAMP)

$(BENCH_VENV)/.installed: requirements-aiperf.txt
	test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install -q --disable-pip-version-check -r requirements-aiperf.txt
	touch $(BENCH_VENV)/.installed

bench: $(BENCH_STAMP) $(BENCH_VENV)/.installed
	$(PY) -m bench.serving --output-len 32 $(BENCH_TO)
	$(PY) -m bench.batching --requests 32 --output-len 16 $(BENCH_TO)
	$(PY) -m bench.convert_memory --sizes-gb 1,2,4 --tp 1,4 --repeats 2 --baseline-max-gb 2 $(BENCH_TO)
	$(PY) -m bench.training --quick --repeats 3 $(BENCH_TO)

bench-compare: $(BENCH_STAMP)
	$(MAKE) bench BENCH_OUT=runs/bench
	$(PY) -m bench.compare --baseline bench/results.json --new runs/bench/results.json
