# One-command entry points. Each creates ./.venv (or $VENV) and installs first.
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO := runs/demo

.PHONY: install demo test bench clean-demo

$(VENV)/.installed: setup.py
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

# Train the demo DVA on the embedded sample, then the demo attribute classifier,
# then edit a sample clip with it.
demo: install
	$(PY) -m s3jax.train --config configs/voxceleb.py:demo --workdir $(DEMO)

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) benchmarks/run_all.py

clean-demo:
	rm -rf $(DEMO) runs/data/sample
