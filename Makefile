# Two commands a newcomer needs: `make demo` (prepare -> train -> sample) and `make test`.
# Each creates .venv and installs nanosuno into it on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# The demo uses the pretrained Encodec when its weights are on disk (torch hub cache or CODEC_DIR)
# or can be downloaded, otherwise (in one line) the `spectral` codec fitted on the demo corpus, so
# that it also runs offline, with real (lo-fi) audio. Override with `make demo CODEC=spectral` or
# `make demo CODEC=encodec_24khz CODEC_DIR=/path/to/weights` (an error when the weights are missing).
CODEC_DIR ?=
CODEC ?= auto
DEMO_ARGS ?=

LOCK   := requirements.lock

.PHONY: install demo test clean-demo lock

# Only the versions in requirements.lock are installed (pip, setuptools and wheel included, and the
# build of encodec's source package uses them too: --no-build-isolation), so a release published
# tomorrow cannot change what a fresh clone gets. `make lock` regenerates the lock on purpose.
$(STAMP): setup.cfg pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c $(LOCK) pip setuptools wheel
	$(BIN)/python -m pip install -q --no-build-isolation -c $(LOCK) -e '.[test]'
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

# A fresh resolve of setup.cfg's dependencies (newest releases within its pins) into requirements.lock.
# Then run `make test` and `make demo` on it, and commit the lock once they pass (README: Upgrading).
lock:
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install -q --upgrade pip setuptools wheel
	.lock-venv/bin/python -m pip install -q --no-build-isolation '.[test]'
	{ echo "# Exact versions of everything \`make install\` installs (pip -c). Regenerate with \`make lock\`,"; \
	  echo "# run \`make test\` and \`make demo\`, commit when they pass. Made with $$(.lock-venv/bin/python --version)."; \
	  .lock-venv/bin/python -m pip freeze --all --exclude nanosuno; } > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)
	rm -rf .lock-venv build   # (build/: what installing the package itself left)
	rm -f $(STAMP)
	@echo "wrote $(LOCK): now run make test and make demo, then commit it"
