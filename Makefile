# Two entry points, each doing all its set-up on a fresh machine:
#   make run    the whole bake-off on the embedded default (SmolLM2-135M, two built-in tasks)
#   make test   the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
# The CPU build of torch here; GPU machines: see docs/gpu.md.
TORCH  ?= torch==2.13.0
EXTRAS ?= dev

export DVC_NO_ANALYTICS = 1
export PREFECT_SERVER_ANALYTICS_ENABLED = false
export HF_HUB_OFFLINE = 1
export TOKENIZERS_PARALLELISM = false

.PHONY: setup allocator run test clean

setup: $(VENV)/.installed allocator

# tcmalloc for the train stage's process (tuneoff/training/allocator.py): lower peak memory than glibc's malloc
# and no slower. Installed where this runs as root with apt; elsewhere training uses the C library's.
TCMALLOC_PKG = libtcmalloc-minimal4
allocator:
	@$(PYTHON) -c "import ctypes.util, sys; sys.exit(not ctypes.util.find_library('tcmalloc_minimal'))" \
	  || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	       && { export DEBIAN_FRONTEND=noninteractive; apt-get install -y -qq $(TCMALLOC_PKG) || { apt-get update -qq && apt-get install -y -qq $(TCMALLOC_PKG); }; } >/dev/null 2>&1; } \
	  || echo "note: $(TCMALLOC_PKG) not installed; training runs on the C library's malloc (docs/performance.md)"

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

run: setup
	$(BIN)/dvc config --local core.analytics false
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/tuneoff run
	@echo "report: reports/report.md (charts: reports/*.png); decision: registry/decision.json"

test: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/pytest -q --durations=15

clean:
	rm -rf models data/prepared runs
