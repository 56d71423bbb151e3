# Two commands set everything up from a fresh clone: `make book` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.adlib-installed

# Every cache and generated data set stays inside the work tree; nothing reaches a model hub.
CACHE := $(CURDIR)/.cache
export ADLIB_DATA       ?= $(CACHE)/data
export MPLCONFIGDIR     := $(CACHE)/matplotlib
export IPYTHONDIR       := $(CACHE)/ipython
export JUPYTER_DATA_DIR := $(CACHE)/jupyter
export HF_HOME          := $(CACHE)/huggingface
export TORCH_HOME       := $(CACHE)/torch
export SCIKIT_LEARN_DATA := $(CACHE)/scikit_learn
export HF_HUB_OFFLINE   := 1
export PYTHONHASHSEED   := 0
# One thread per process: numbers repeat exactly (they move in the 2nd decimal between thread counts) and
# small convolutions do not thrash on shared 2-core machines. Override: make book OMP_NUM_THREADS=8
export OMP_NUM_THREADS  ?= 1

.PHONY: setup book test test-unit lint expected expected-smoke check-lock lock clean

setup: $(STAMP)

# The exact versions of constraints.txt (the lock): a fresh clone gets the packages that made the book's numbers.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[book,test]"
	touch $(STAMP)

book: setup
	$(BIN)/python tools/book_cache.py  # adlib, its weights or the lock changed: every chapter executes again
	touch book/scorecard.md  # it pastes the chapters' glued claims: re-render it even when only a chapter changed
	$(BIN)/python tools/exercise_copies.py  # book/exercises/: the teacher's page links them
	$(BIN)/python tools/check_expected.py --tally book/_generated  # the scorecard's tally of book/expected.json
	$(BIN)/jupyter-book build . -W -n --keep-going
	$(BIN)/python tools/check_expected.py  # the guard: no recorded verdict changed, no number moved
	@echo
	@echo "Book built. Open: $(CURDIR)/_build/html/book/intro.html"

# Two workers, one per core; a test file stays on one worker (the chapters run one after another, as they share
# the generated data sets).
test: setup lint
	$(BIN)/python -m pytest -n 2 --dist loadfile

# The unit tests alone (no chapter runs, no book build).
test-unit: setup
	$(BIN)/python -m pytest -m "not notebook and not book"

# The library: pycodestyle, pyflakes, import order. The chapters: formatted, and every code line fits the book's
# 88 columns (notebooks/ruff.toml; the template uses the same settings).
lint: setup
	$(BIN)/ruff check adlib tests tools
	$(BIN)/ruff format --check notebooks
	$(BIN)/ruff format --check --config notebooks/ruff.toml book/chapter_template.ipynb
	$(BIN)/ruff check notebooks
	$(BIN)/ruff check --config notebooks/ruff.toml book/chapter_template.ipynb

# Record the last build's numbers and verdicts as the expected ones (prints what moved): make expected REASON="..."
expected: setup
	$(BIN)/python tools/check_expected.py --write --reason "$(REASON)"
	$(BIN)/python tools/check_expected.py --tally book/_generated

# The same for the smoke profile's twin, which `make test` checks (runs every chapter at the smoke profile first).
expected-smoke: setup
	-$(BIN)/python -m pytest -q -m notebook tests/test_notebooks.py
	$(BIN)/python tools/check_expected.py --executed build/executed --expected book/expected_smoke.json \
	  --write --reason "$(REASON)"

# Colab runs CPython 3.13: the locked set must resolve there from wheels alone (no 3.13 interpreter needed here).
MANYLINUX := $(foreach m,17 18 19 20 21 22 23 24 25 26 27 28 29 30 31 32 33 34 35,--platform manylinux_2_$(m)_x86_64)
check-lock: setup
	$(BIN)/python -m pip install --quiet --dry-run --ignore-installed --only-binary=:all: --python-version 3.13 \
	  --implementation cp --abi cp313 $(MANYLINUX) --platform manylinux2014_x86_64 \
	  --target $(CACHE)/lock-check-313 -c constraints.txt -r constraints.txt
	@echo "constraints.txt resolves for CPython 3.13 (manylinux x86_64)."

# Rewrite the lock from a clean environment (then rerun the book and say in the commit which numbers moved).
lock:
	rm -rf $(CACHE)/lock-venv
	$(PYTHON) -m venv $(CACHE)/lock-venv
	$(CACHE)/lock-venv/bin/python -m pip install --quiet --upgrade pip
	$(CACHE)/lock-venv/bin/python -m pip install --quiet -e ".[book,test]"
	(sed -n '/^#/p' constraints.txt; $(CACHE)/lock-venv/bin/python -m pip freeze --exclude-editable) > constraints.txt.new
	mv constraints.txt.new constraints.txt

clean:
	rm -rf _build build .cache .pytest_cache
