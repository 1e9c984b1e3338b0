# memplan: `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint clean

# torch first, so nothing pulls a multi-GB CUDA build: reuse an importable torch >= 2.11
# (e.g. a GPU machine's), otherwise install the 2.13.0 CPU wheel on this disk.
$(STAMP): setup.cfg pyproject.toml
	@if [ ! -x $(BIN)/python ]; then \
	  if $(PYTHON) -c "import sys, torch; v = torch.__version__.split('+')[0].split('.'); sys.exit((int(v[0]), int(v[1])) < (2, 11))" 2>/dev/null; then \
	    echo "using the installed torch"; $(PYTHON) -m venv --system-site-packages $(VENV); \
	  else $(PYTHON) -m venv $(VENV); fi; \
	fi
	$(BIN)/python -m pip install -q --upgrade pip
	@$(BIN)/python -c "import sys, torch; v = torch.__version__.split('+')[0].split('.'); sys.exit((int(v[0]), int(v[1])) < (2, 11))" 2>/dev/null \
	  || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)

# A dry-run plan of a real model (MEMO's setting: Llama-2-7B, 1M tokens, 8 x A800), then a
# short real training run of the tiny model on this machine's CPU.
demo: $(STAMP)
	$(BIN)/memplan plan model=llama2_7b cluster=a800_8x train.seq_len=1048576 train.global_batch_size=1
	$(BIN)/memplan train

# lint-imports: the one-way layering contracts in setup.cfg; a violation fails the run.
test: $(STAMP)
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) runs outputs multirun .pytest_cache
