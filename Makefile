# Entry points for a newcomer: `make demo`, `make check` (the quick tier: every test that never runs
# the real backbone, a few minutes) and `make test` (everything). Each creates or reuses .venv.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.edgetl-installed
DEMO   ?= demo-out

.PHONY: demo check test lint install clean bench

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[train,test,text-train,fleet,fleet-sim,report,serve]'
	touch $(STAMP)

install: $(STAMP)

# Builds the built-in example from scikit-image photographs, fits an INT8 bundle for x86 CPU,
# evaluates it and classifies a few images, all through the CLI a user would type.
demo: $(STAMP)
	$(VENV)/bin/edgetl example surfaces $(DEMO)/surfaces --force
	$(VENV)/bin/edgetl fit $(DEMO)/surfaces --out $(DEMO)/surfaces.bundle --force
	$(VENV)/bin/edgetl eval $(DEMO)/surfaces.bundle $(DEMO)/surfaces/val
	$(VENV)/bin/edgetl predict $(DEMO)/surfaces.bundle $(DEMO)/surfaces/val --top-k 2 | head -n 8

# pytest's exit code 5 means it collected nothing (a wrong -m or -k, a broken conftest): a failure
# here, said in words, never a silent pass. make itself then exits 2, as for any failed recipe.
PYTEST = $(PY) -m pytest -q --durations=15 $(1) tests || { rc=$$?; [ $$rc -ne 5 ] || echo "pytest collected no tests" >&2; exit $$rc; }

# The quick tier: leaves out the tests marked slow (real backbone, quantizers, browsers, Flower,
# emulated CPUs, other interpreters; see tests/conftest.py). No system packages needed.
check: $(STAMP)
	$(call PYTEST,-m "not slow")

test: $(STAMP)
	bash tools/system-deps.sh
	$(call PYTEST,)

# Lint, format and types, as CI runs them before the tests (settings in pyproject.toml).
lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks tools
	$(VENV)/bin/ruff format --check src tests benchmarks tools
	$(VENV)/bin/mypy

# Every benchmark script, one after another (the emulated-CPU one needs qemu-user-static).
bench: $(STAMP)
	for b in benchmarks/*.py; do \
	  case $$b in *emulated_cpus.py) command -v qemu-aarch64-static >/dev/null || { echo "skip $$b: no qemu-user-static"; continue; };; esac; \
	  $(PY) $$b || exit 1; done

clean:
	rm -rf $(DEMO) .pytest_cache
