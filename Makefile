# Two commands for a newcomer: `make book` and `make test`. Both create .venv with
# the pinned versions (requirements.lock) and install TeX when it is missing.
# Python 3.11, 3.12 or 3.13: the newest one on PATH that runs, or PYTHON=python3.12 (any path).
PYTHON ?= $(or $(firstword $(foreach v,3.13 3.12 3.11,$(shell python$(v) -c 'print("python$(v)")' 2>/dev/null))),python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# torch from PyTorch's CPU wheel index (no CUDA libraries) unless an NVIDIA GPU is present;
# macOS wheels on PyPI are CPU/MPS builds already. TORCH_INDEX=<url> picks another index,
# TORCH_INDEX= (empty) leaves torch to pip's configured index. book/install.py does the rest.
ifeq ($(shell uname -s),Darwin)
TORCH_INDEX ?=
else
TORCH_INDEX ?= $(if $(shell command -v nvidia-smi 2>/dev/null),,https://download.pytorch.org/whl/cpu)
endif
# A minutes-long check that an install works: the dependency-heavy unit tests and one chapter under nbval.
FAST_TESTS := tests/test_environment.py tests/test_setup.py tests/test_bpe_tokenizer.py tests/test_layers.py \
              tests/test_attention.py tests/test_model.py tests/test_hf_convert.py tests/test_lora.py \
              tests/test_dpo.py tests/test_flash_triton.py tests/test_rule_filters.py tests/test_minhash.py \
              tests/test_langid.py tests/test_eval_harness.py tests/test_serve.py
FAST_CHAPTER := chapters/01_what_it_takes.md
APT_PACKAGES := texlive-xetex texlive-fonts-recommended texlive-plain-generic \
                texlive-latex-extra pandoc poppler-utils fonts-dejavu-core lmodern

.PHONY: book test test-fast venv tex system-deps starters notebooks lint lock clean

book: $(STAMP) tex          ## execute every chapter and build build/{book,exercises,solutions}.pdf
	$(PY) build_pdf.py $(ARGS)

test: $(STAMP) tex          ## unit tests, exercise checks, every notebook executed once (cached for the book), a PDF build
	$(PY) -m pytest $(ARGS)

test-fast: $(STAMP)         ## minutes: the unit tests that touch every compiled dependency, and Chapter 1 under nbval
	$(PY) -m pytest -q $(FAST_TESTS) $(ARGS)
	$(PY) -m pytest -q --nbval-lax --nbval-current-env $(FAST_CHAPTER) $(ARGS)

venv: $(STAMP)

ifneq ($(shell grep -s '^uv = ' $(VENV)/pyvenv.cfg),)
# A venv made by `uv sync` is uv's to keep in step with the lock (`uv run` syncs it first): make only uses it.
$(STAMP):
	@touch $(STAMP)
else
# Only the lock is a prerequisite: a dependency change in pyproject.toml reaches it through `make lock`.
$(STAMP): requirements.lock
	@$(PYTHON) book/install.py --check-python
	@if [ -x $(PY) ] && [ "$$($(PY) -c 'import sys; print(sys.version_info[:2])')" != "$$($(PYTHON) -c 'import sys; print(sys.version_info[:2])')" ]; then \
	  echo "$(VENV) holds another Python than $(PYTHON): remove it (rm -rf $(VENV)) or set PYTHON to the one it was made with"; exit 1; fi
	$(PYTHON) -m venv $(VENV)
	$(PY) book/install.py --torch-index "$(TORCH_INDEX)"
	@touch $(STAMP)
endif

# TeX and pandoc for the PDFs: installed with apt-get when missing and we are root.
tex:
	@if command -v xelatex >/dev/null && command -v pandoc >/dev/null && command -v pdftotext >/dev/null \
	    && fc-list | grep -q "DejaVu Sans Mono"; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then $(MAKE) --no-print-directory system-deps; \
	elif [ "$$(uname -s)" = Darwin ]; then echo "TeX, pandoc or poppler is missing. Install them with:"; \
	     echo "  brew install pandoc poppler fontconfig && brew install --cask mactex-no-gui font-dejavu"; exit 1; \
	else echo "TeX, pandoc or poppler is missing. Install them with:"; \
	     echo "  sudo apt-get install -y $(APT_PACKAGES)"; exit 1; fi

system-deps:                ## (root) install TeX, pandoc, poppler and fonts with apt-get
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(APT_PACKAGES) >/dev/null

starters: $(STAMP)          ## regenerate exercises/ from solutions/
	$(PY) build_pdf.py --starters

notebooks: $(STAMP)         ## .ipynb copies of chapters, exercises and solutions in notebooks/
	$(PY) build_pdf.py --notebooks notebooks

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests build_pdf.py conftest.py benchmarks

# Re-pin after changing dependencies: writes requirements.lock and environment.yml.
lock: $(STAMP)
	$(VENV)/bin/pip install --quiet -e '.[book]'
	$(PY) book/lock.py

# Removes build outputs only: notebooks/ holds the reader's exercise work and is never deleted here.
clean:
	rm -rf build
