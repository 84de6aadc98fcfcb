# The two commands of the README: `make demo` and `make test`. Both create .venv on first use.
# torch is installed first and pinned, so that a CPU machine never pulls a CUDA build
# (override TORCH, e.g. TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu").
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

$(BIN)/.installed: setup.py Resources/requirements.txt Testing/requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -c Testing/constraints.txt -r Testing/requirements.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $@

.PHONY: setup demo test bench
setup: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/medvlsm demo --allow-untrained

test: $(BIN)/.installed
	QT_QPA_PLATFORM=offscreen $(BIN)/python -m pytest -q -rs -p no:cacheprovider Testing

bench: $(BIN)/.installed
	$(BIN)/python bench/bench_engine.py --quick
