# Two commands do everything on a fresh machine:
#   make figures   set up, regenerate every figure and data file, build the executed chapters
#   make test      set up, run every test (unit, property, chapters, browser)
# make lab opens JupyterLab on notebooks/.

PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
PY      = $(BIN)/python
# GPU users: TORCH_SPEC="torch==2.13.0" with the CUDA index of their choice in PIP_EXTRA_INDEX_URL.
TORCH_SPEC ?= torch==2.13.0
STAMP   = $(VENV)/.installed

.PHONY: env figures notebooks benchmarks test lab lint browser-deps clean lab-results

env: $(STAMP)

$(STAMP): pyproject.toml lab/overrides.json
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and alone, so that no later dependency pulls a CUDA build
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[test]"
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (PEFT companion)" >/dev/null
	# JupyterLab opens the percent .py chapters as notebooks (jupytext's viewer), with no news pop-ups
	mkdir -p $(VENV)/share/jupyter/lab/settings
	cp lab/overrides.json $(VENV)/share/jupyter/lab/settings/overrides.json
	touch $(STAMP)

figures: env
	# the memory model's validation grid (estimate vs fake-tensor simulation), chapter 08's multi-task runs
	# (deterministic, ~2-3 min on 2 cores), then every figure
	$(PY) benchmarks/memory_grid.py
	# the zoo's snapshots (resolved config and layout of each model without a hand layout: no torch to answer)
	$(PY) -m survey_utils.snapshots
	$(PY) -m survey_utils.experiments.ch08_multi_task
	# chapter 09's lab: rerun one committed grid cell and check it reproduces its row bit for bit
	$(PY) -m survey_utils.lab check
	$(PY) -m survey_utils figures --out figures
	$(MAKE) notebooks

# chapter 09's lab: pretrain the three sizes (cached in _build/lab) and run the whole grid into data/lab
# (about 15 minutes on 2 cores; every CSV but timings.csv comes back byte for byte)
lab-results: env
	$(PY) -m survey_utils.lab results

notebooks: env
	$(PY) -m survey_utils build-notebooks --out _build/notebooks

benchmarks: env
	$(PY) benchmarks/run_all.py

# Chromium counts as installed where tests/browser/conftest.py's chromium_executable() would find it:
# $CHROMIUM, else chromium on the PATH, else /usr/bin/chromium. `env` sets the variable for apt-get both
# as root (SUDO empty: a bare VAR=value after an expansion is a command name) and under sudo (which drops
# the caller's environment).
browser-deps:
	@chromium="$${CHROMIUM:-$$(command -v chromium || echo /usr/bin/chromium)}"; \
	[ -x "$$chromium" ] || { \
	  echo "installing Debian chromium for the browser test ($$chromium not found)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; }

test: env browser-deps
	$(BIN)/ruff check survey_utils tests notebooks benchmarks
	$(BIN)/pytest -n 2 --dist loadgroup --durations=25

lab: env
	$(BIN)/jupyter lab notebooks/

lint: env
	$(BIN)/ruff check survey_utils tests notebooks benchmarks

clean:
	rm -rf $(VENV) _build .pytest_cache .hypothesis
