# The two commands of the README: `make demo` and `make test`. Both create .venv on first use.
# `make demo` installs the runtime only (torch, Resources/requirements-standalone.txt, medvlsm); `make test` adds
# the test environment (slicer-core with VTK, PySide6, pytest) to the same .venv.
# torch is installed first and pinned. On Linux the package index's torch==2.13.0 is the CUDA build
# (several GB); on a CPU-only machine ask for the CPU build:
#   make demo TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
# (machines with a local wheel folder, like this project's, get the CPU build from it as they are).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

$(BIN)/.runtime: setup.py Resources/requirements.txt Resources/requirements-standalone.txt Testing/constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "medvlsm needs Python 3.11 or newer (its pinned numpy, scipy, matplotlib and transformers do); this is " + sys.version.split()[0] + ". Run: make demo PYTHON=python3.11")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -c Testing/constraints.txt -r Resources/requirements-standalone.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $@

$(BIN)/.installed: $(BIN)/.runtime Testing/requirements.txt
	$(BIN)/python -m pip install -q -c Testing/constraints.txt -r Testing/requirements.txt
	touch $@

# The lowest transformers setup.py accepts (the first that takes the pinned huggingface_hub 2.x), in a
# folder put first on PYTHONPATH: `make test` runs the model tests again on it.
TRANSFORMERS_LOWEST := transformers==5.18.0
LOWEST := $(VENV)/transformers-lowest
$(LOWEST)/.installed: Makefile
	rm -rf $(LOWEST)
	$(BIN)/python -m pip install -q --no-deps --target $(LOWEST) $(TRANSFORMERS_LOWEST)
	touch $@
MODEL_TESTS := Testing/test_engine.py Testing/test_cris.py Testing/test_biomedclipseg.py Testing/test_architectures.py

.PHONY: setup demo test bench
setup: $(BIN)/.installed $(LOWEST)/.installed

demo: $(BIN)/.runtime
	$(BIN)/medvlsm demo --allow-untrained

test: $(BIN)/.installed $(LOWEST)/.installed
	QT_QPA_PLATFORM=offscreen $(BIN)/python -m pytest -q -rs -p no:cacheprovider Testing
	@echo "The model tests on the lowest declared $(TRANSFORMERS_LOWEST) (the full-size ones ran above):"
	PYTHONPATH=$(LOWEST) MEDVLSM_EXPECT_TRANSFORMERS=$(TRANSFORMERS_LOWEST) $(BIN)/python -m pytest -q -p no:cacheprovider \
		$(MODEL_TESTS) -k "not full and not convert_command and not biomedclipseg_d"

bench: $(BIN)/.installed
	$(BIN)/python bench/bench_engine.py --quick
