# The two set-up commands of the README: `make demo` (the default benchmark) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q -c constraints.txt

.PHONY: demo test test-slow lint clean

$(VENV)/.base: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e .
	touch $@

# The test extra adds pytest, hypothesis, ruff and mypy (for the stub test); the tune extra adds Syne Tune for `retain tune`;
# the hf extra adds transformers for the text example (examples/text_config.py) and its test.
$(VENV)/.test: $(VENV)/.base
	$(PIP) -e '.[test,tune,hf]'
	touch $@

demo: $(VENV)/.base
	$(VENV)/bin/retain benchmark --output runs/demo

# `make test` leaves out the tests marked slow (real torchrun launches, whole default benchmarks):
# CI runs them too, with `make test-slow`.
test: $(VENV)/.test
	$(VENV)/bin/ruff check src tests benchmarks tools
	$(PY) -m pytest -q -m "not slow"

test-slow: $(VENV)/.test
	$(PY) -m pytest -q -m slow

lint: $(VENV)/.test
	$(VENV)/bin/ruff check src tests benchmarks tools

clean:
	rm -rf $(VENV) runs
