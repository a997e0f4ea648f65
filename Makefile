# Two commands a newcomer needs: `make demo` (prepare -> train -> sample) and `make test`.
# Each creates .venv and installs nanosuno into it on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# The demo uses the pretrained Encodec when its weights are on disk (torch hub cache or CODEC_DIR)
# or can be downloaded, otherwise (with a loud warning) the `untrained` codec, so that it also runs
# offline. Override with `make demo CODEC=untrained` or
# `make demo CODEC=encodec_24khz CODEC_DIR=/path/to/weights` (an error when the weights are missing).
CODEC_DIR ?=
CODEC ?= auto
DEMO_ARGS ?=

.PHONY: install demo test clean-demo

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python prepare.py config/tiny.py --codec=$(CODEC) $(if $(CODEC_DIR),--codec_dir=$(CODEC_DIR)) $(DEMO_ARGS)
	$(BIN)/python train.py config/tiny.py $(DEMO_ARGS)
	$(BIN)/python sample.py config/tiny.py $(if $(CODEC_DIR),--codec_dir=$(CODEC_DIR)) $(DEMO_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

clean-demo:
	rm -rf data/tokens out-tiny
