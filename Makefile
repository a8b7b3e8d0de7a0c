# Two commands for a newcomer: `make book` and `make test`. Both create .venv with
# the pinned versions (requirements.lock) and install TeX when it is missing.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
APT_PACKAGES := texlive-xetex texlive-fonts-recommended texlive-plain-generic \
                texlive-latex-extra pandoc poppler-utils fonts-dejavu-core lmodern

.PHONY: book test venv tex system-deps starters notebooks lint lock clean

book: $(STAMP) tex          ## execute every chapter and build build/{book,exercises,solutions}.pdf
	$(PY) build_pdf.py $(ARGS)

test: $(STAMP) tex          ## unit tests, exercise checks, every notebook executed once (cached for the book), a PDF build
	$(PY) -m pytest $(ARGS)

venv: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "the book is pinned for Python 3.11; set PYTHON=python3.11"'
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet -r requirements.lock
	$(VENV)/bin/pip install --quiet --no-deps -e .
	@touch $(STAMP)

# TeX and pandoc for the PDFs: installed with apt-get when missing and we are root.
tex:
	@if command -v xelatex >/dev/null && command -v pandoc >/dev/null && command -v pdftotext >/dev/null \
	    && fc-list | grep -q "DejaVu Sans Mono"; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then $(MAKE) --no-print-directory system-deps; \
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
