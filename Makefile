# HippoVolume — set-up and the two everyday commands.
#   make demo   set up (if needed) and train on the embedded synthetic data set
#   make test   set up (if needed) and run the whole test suite (what CI runs)
# On a CPU machine the CPU build of torch is installed first (TORCH_SPEC) so that no multi-GB CUDA
# build is pulled; on a GPU machine use e.g. `make setup TORCH_SPEC=torch==2.13.0 TORCH_INDEX=...`.

PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
PIP_FLAGS   ?= -q --disable-pip-version-check
BIN         := $(VENV)/bin

.PHONY: setup demo test test-fast clean-outputs

$(BIN)/.hippo-installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install $(PIP_FLAGS) "$(TORCH_SPEC)"
	$(BIN)/pip install $(PIP_FLAGS) -e ".[dev]"
	touch $@

setup: $(BIN)/.hippo-installed

demo: setup
	$(BIN)/python -m hippo.train

test: setup
	$(BIN)/python -m pytest -q

# the default suite without the slow real-data training and wheel build
test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

clean-outputs:
	rm -rf outputs/train outputs/eval outputs/curate outputs/debug outputs/data
