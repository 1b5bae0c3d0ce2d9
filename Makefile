# Two commands on a fresh machine:  `make generate` (the main job) and `make test`.
# Without hub access, `make generate-synthetic` runs the same path on a random-weight checkpoint.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Tests and local runs use this torch instead of requirements.txt's (the Cog image's) pin.
TORCH ?= torch==2.13.0
PORT ?= 5000
LCM_WEIGHTS_DIR ?= weights
PROMPT ?= Self-portrait oil painting, a beautiful cyborg with golden hair, 8k
OUT ?= out
SYNTHETIC_DIR ?= weights/synthetic
export LCM_WEIGHTS_DIR

.PHONY: venv test soak bench lint generate generate-synthetic weights synthetic schema docs serve device-wheels clean

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt requirements-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -r <(grep -v '^torch==' requirements.txt) -r requirements-dev.txt \
	  -r requirements-cpu.txt
	touch $@

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest -q

# 500 predictions over HTTP, sync and async: lost/failed predictions, memory, files, descriptors.
soak: venv
	$(PY) -m pytest -q -s -m soak

# Ours against diffusers' reference pipeline in one process: python -m bench --help for options.
BENCH_ARGS ?= --device cpu --size 256
bench: venv
	$(PY) -m bench $(BENCH_ARGS)

# Fill the weights directory from the hub if it is incomplete.
weights: venv
	@$(PY) -c "from lcm.weights import check_weights; check_weights('$(LCM_WEIGHTS_DIR)')" 2>/dev/null \
	  || $(PY) scripts/download-weights --dir "$(LCM_WEIGHTS_DIR)" \
	  || { echo; echo "Could not get the real weights. The same path on a random-weight checkpoint:"; \
	       echo "  make generate-synthetic"; exit 1; }

# A full-size random-weight checkpoint in SYNTHETIC_DIR (the real architecture; its images are noise).
synthetic: venv
	@$(PY) -c "from lcm.weights import check_weights; check_weights('$(SYNTHETIC_DIR)')" 2>/dev/null \
	  || $(PY) -m lcm.synthetic "$(SYNTHETIC_DIR)" --size full

generate: weights
	$(PY) -m lcm generate "$(PROMPT)" --out "$(OUT)" --weights "$(LCM_WEIGHTS_DIR)"

generate-synthetic: synthetic
	$(PY) -m lcm generate "$(PROMPT)" --out "$(OUT)" --weights "$(SYNTHETIC_DIR)"

schema: venv
	$(PY) scripts/openapi-schema

# The input tables in docs/inputs.md and docs/fine-tuning.md, from lcm/params.py and lcm/training.py.
docs: venv
	$(PY) scripts/docs

# One glibc arena from the start: LCM_HOLD_MEMORY's thresholds hold in the main arena only, and Cog's
# worker has threads with arenas of their own; through the server a 256 px CPU request took 17.5 and
# 15.3 s with one arena, 18.4 and 16.9 s without (docs/configuration.md, "One malloc arena").
MALLOC_ARENA_MAX ?= 1

# cog build sets COG_MAX_CONCURRENCY from cog.yaml's concurrency.max; so does this.
COG_MAX_CONCURRENCY ?= $(shell $(PY) -c "import yaml; print(yaml.safe_load(open('cog.yaml'))['concurrency']['max'])" 2>/dev/null)

serve: schema
	PATH="$(abspath $(VENV))/bin:$$PATH" PORT=$(PORT) COG_PREDICT_TYPE_STUB=predict.py:Predictor \
	  MALLOC_ARENA_MAX=$(MALLOC_ARENA_MAX) COG_MAX_CONCURRENCY=$(COG_MAX_CONCURRENCY) \
	  $(PY) -m cog.server.http --host 127.0.0.1

# Wheels for a lent GPU machine (the device tool: Python 3.12, torch 2.11 and most libraries already
# there, no network): the pinned packages its image lacks or has at another version, structlog,
# which cog needs and the image lacks, and psutil and PyYAML, which accelerate needs and the image
# probably has (1 MB together, so not left to chance), into .whl/ (git- and docker-ignored). The
# image's own huggingface_hub, tokenizers, safetensors, Pillow, numpy and packaging satisfy the rest
# (bench/README.md). Of the control, weighting and fine-tuning libraries the image has OpenCV (50 MB of
# wheel, past the 64 MiB a run carries with the rest), peft and pyparsing, not compel: compel is carried.
DEVICE_PINS := diffusers transformers accelerate cog coglet structlog psutil pyyaml compel
device-wheels: venv
	rm -rf .whl
	$(PY) -m pip download -q --no-deps --only-binary=:all: -d .whl \
	  --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
	  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	  $$($(PY) -m pip freeze | grep -iE '^($(subst $() ,|,$(DEVICE_PINS)))==')
	@ls .whl && du -sh .whl

clean:
	rm -rf $(VENV) .cog .pytest_cache .ruff_cache
