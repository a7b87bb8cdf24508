# The two commands of the README:
#   make book   install, execute every notebook (papermill, `cpu` profile), build the site
#   make test   install, lint (ruff), pytest (unit, integration, notebook smoke runs, book build)
# Both set themselves up from nothing (a virtual environment in .venv) and are idempotent.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.medlora-installed
# torch is installed first, pinned to the local CPU wheel known to work here; GPU users
# install their own torch build first (see README) and run `pip install -e .[dev,book]`.
TORCH_SPEC ?= torch==2.13.0

export MEDLORA_CACHE ?= $(CURDIR)/.cache/medlora
export MPLBACKEND := Agg
export PYTHONHASHSEED := 0
export HF_HUB_OFFLINE ?= 1

.PHONY: install book test test-fast lint format clean bench screenshot

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev,book]"
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (medlora)" >/dev/null
	touch $(STAMP)

install: $(STAMP)

book: install
	$(PY) -m medlora_lib.bookrun --profile cpu --out _build

# `--durations` keeps the slowest tests in the log of every run (CI included).
test: install lint
	MEDLORA_MIN_TESTS=500 $(PY) -m pytest --durations=25

# The edit-test loop: everything but the tests marked slow (notebook smoke runs, Flower
# simulations and loopback deployments, the clean-venv install); `make test` runs all.
test-fast: install
	$(PY) -m pytest -m "not slow" -q --durations=10

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: install
	$(PY) benchmarks/bench_data.py
	$(PY) benchmarks/bench_model.py
	$(PY) benchmarks/bench_prefix_cache.py
	$(PY) benchmarks/bench_metrics.py
	$(PY) benchmarks/bench_federation.py
	$(PY) benchmarks/bench_flower_startup.py --run
	$(PY) benchmarks/bench_privacy.py
	$(PY) benchmarks/bench_memory.py
	$(PY) benchmarks/bench_inprocess.py
	$(PY) benchmarks/bench_book_floor.py

# Headless-browser check of the site built by `make book` (not part of book / test):
# screenshots SCREENSHOT_PAGES into _build/screenshots/ and fails on a blank or broken
# page. Installs Debian's chromium with apt-get when no Chromium / Chrome is found.
SITE_HTML        ?= _build/site-cpu/_build/html
SCREENSHOT_PAGES ?= index.html notebooks/00_foundation_model_and_lora.html notebooks/02_single_site_baseline.html

screenshot: install
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 \
	  || command -v google-chrome >/dev/null 2>&1 || [ -n "$$CHROMIUM" ] \
	  || { echo "installing chromium with apt-get"; \
	       SUDO=$$( [ "$$(id -u)" -eq 0 ] || echo sudo ); \
	       $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium; }
	@test -f $(SITE_HTML)/index.html \
	  || { echo "no site in $(SITE_HTML): run make book first"; exit 1; }
	$(PY) docs/dev/screenshot_site.py $(SITE_HTML) $(SCREENSHOT_PAGES) --out _build/screenshots

clean:
	rm -rf _build .pytest_cache .ruff_cache
