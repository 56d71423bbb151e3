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

.PHONY: setup book test clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[book,test]"
	touch $(STAMP)

book: setup
	$(BIN)/jupyter-book build . -W -n --keep-going
	@echo
	@echo "Book built. Open: $(CURDIR)/_build/html/book/intro.html"

test: setup
	$(BIN)/python -m pytest

clean:
	rm -rf _build build .cache .pytest_cache
