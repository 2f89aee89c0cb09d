# Entry points: `make demo` and `make test` are the whole set-up.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CLI := $(PY) -m mlprobe.cli

# Variables of `make extract` and `make probe`.
DATASET ?= voc2007
ROOT ?= data/VOCdevkit
MODEL ?= tf_efficientnet_lite0
IMAGE_SIZE ?= 224
FEATURES ?= runs/features
OUT ?= runs/$(DATASET)
EXTRACT_ARGS ?=
PROBE_ARGS ?=

.PHONY: install demo extract probe test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $@

demo: install
	$(CLI) demo --data data/demo --out runs/demo

extract: install
	$(CLI) extract --dataset $(DATASET) --root $(ROOT) --model $(MODEL) \
		--image-size $(IMAGE_SIZE) --out $(FEATURES) $(EXTRACT_ARGS)

probe: install
	$(CLI) probe --features $(FEATURES) --dataset $(DATASET) --model $(MODEL) \
		--image-size $(IMAGE_SIZE) --out $(OUT) $(PROBE_ARGS)

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) -m bench.run

clean:
	rm -rf runs/demo data/demo .pytest_cache
