# HippoVolume — set-up and the two everyday commands.
#   make demo   set up (if needed), then scripts/demo.sh: a DICOM study from the scanner emulator measured
#               by the shipped model and by a short training run's model on the synthetic set (no services)
#   make test   set up (if needed) and run the whole test suite (what CI runs)
# On a CPU machine the CPU build of torch is installed first (TORCH_SPEC) so that no multi-GB CUDA
# build is pulled; on a GPU machine use e.g. `make setup TORCH_SPEC=torch==2.13.0 TORCH_INDEX=...`.

PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
PIP_FLAGS   ?= -q --disable-pip-version-check
BIN         := $(VENV)/bin

# Debian packages the clinical network and its tests use (PACS, DICOM tools, headless browser);
# dicom3tools provides dciodvfy, the IOD validator the result objects are checked with.
DEB_PACKAGES ?= orthanc orthanc-dicomweb dcmtk dicom3tools chromium
SUDO        := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup system-deps demo test test-fast bench clean-outputs

$(BIN)/.hippo-installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install $(PIP_FLAGS) "$(TORCH_SPEC)"
	$(BIN)/pip install $(PIP_FLAGS) -e ".[dev]"
	touch $@

setup: $(BIN)/.hippo-installed

# installs the Debian packages once (skipped when Orthanc, chromium, storescu and dciodvfy are already there)
system-deps:
	@if command -v Orthanc >/dev/null && command -v chromium >/dev/null && command -v storescu >/dev/null \
		&& command -v dciodvfy >/dev/null; then \
		echo "system packages present"; \
	else \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $(DEB_PACKAGES); \
	fi

# after the install: about 1 min on 2 idle cores, 2.8 min with another training run on them
demo: setup
	bash scripts/demo.sh $(BIN)/python

test: setup system-deps
	$(BIN)/python -m pytest -q

# without the slow real-data training, the wheel build and the service-backed tests
test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow and not service"

# model (loading, training, inference vs compute bound) and deployment (stages, 1/2/4 workers,
# peak memory) benchmarks; figures printed and written to outputs/benchmarks/*.json
bench: setup
	$(BIN)/python benchmarks/bench_model.py
	$(BIN)/python benchmarks/bench_deploy.py

clean-outputs:
	rm -rf outputs/train outputs/eval outputs/curate outputs/debug outputs/data
