# Two entry points for a fresh machine (see README): `make main` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= out

.PHONY: setup main test bench default-denoiser

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

# The main job: the whole study on the embedded default (digits + the shipped denoiser) -> $(OUT)/study/report.html
main: setup
	$(BIN)/diffaug study --out $(OUT)/study

test: setup
	$(BIN)/python -m pytest -n 2 -q

bench: setup
	$(BIN)/python benchmarks/bench_diffaug.py

# Reproduces the shipped default denoiser (about 28 minutes on 2 CPU cores).
default-denoiser: setup
	$(BIN)/diffaug train-diffusion --data digits --seed 0 --out runs/digits-default
	rm -rf src/diffaug/weights/digits && mkdir -p src/diffaug/weights/digits
	cp -r runs/digits-default/unet runs/digits-default/scheduler runs/digits-default/diffaug.json \
	      runs/digits-default/samples.png runs/digits-default/train_config.json src/diffaug/weights/digits/
