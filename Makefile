# One place for the install: torch 2.13.0 first, then moshi 0.2.13 without its torch<2.10 pin,
# then moshi's real runtime needs and ours (pyproject.toml). A stamp file makes reruns free.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed-stamp

TORCH_VERSION := 2.13.0
MOSHI_VERSION := 0.2.13
MOSHI_RUNTIME := "numpy>=1.26,<2.3" "safetensors>=0.4,<0.8" "huggingface_hub>=0.24,<1.0" \
                 "einops>=0.7,<0.9" "sentencepiece>=0.2,<0.3" "sphn>=0.2,<0.3" "tqdm>=4.48" \
                 "aiohttp>=3.10.5,<3.12"

.PHONY: install install-client demo test lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip setuptools
	$(PIP) install --quiet "torch==$(TORCH_VERSION)"
	$(PIP) install --quiet --no-deps "moshi==$(MOSHI_VERSION)"
	$(PIP) install --quiet $(MOSHI_RUNTIME)
	$(PIP) install --quiet --no-build-isolation -e ".[dev]"
	$(PY) -c "import torch, moshi; assert torch.__version__.startswith('$(TORCH_VERSION)'), torch.__version__"
	touch $(STAMP)

install-client: $(STAMP)
	$(PIP) install --quiet --no-build-isolation -e ".[dev,client]"

demo: $(STAMP)
	$(VENV)/bin/moshi-ttt demo

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/ttt_layer.py

clean:
	rm -rf $(VENV) demo_out .pytest_cache
