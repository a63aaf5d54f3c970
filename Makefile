# One-command entry points. Each creates ./.venv (or $VENV) and installs first.
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO := runs/demo

.PHONY: install demo demo-s3editor test bench clean-demo

$(VENV)/.installed: setup.py
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

# Compiled XLA programs are cached here so the later demo steps reuse them.
export JAX_COMPILATION_CACHE_DIR ?= $(CURDIR)/runs/.jax_cache

# Train the demo DVA on the embedded sample, then the demo attribute classifier,
# then edit a held-out sample clip with it (input | edit side by side).
demo: install
	$(PY) -m s3jax.train --config configs/voxceleb.py:demo --workdir $(DEMO)
	$(PY) -m s3jax.train --config configs/celebahq_classifier.py:demo --workdir $(DEMO)/classifier
	$(PY) -m data_prep.sample --clip $(DEMO)/edit/sample_clip.mp4 --frames 24
	$(PY) -m s3jax.edit --checkpoint $(DEMO) --input $(DEMO)/edit/sample_clip.mp4 \
	    --attribute Mouth_Wide --strength 1.5 --steps 20 --blend feather --side-by-side \
	    --out $(DEMO)/edit/edited.mp4
	@echo "demo outputs: $(DEMO)/samples/, $(DEMO)/classifier/classifier.json, $(DEMO)/edit/"

# After `make demo`: S3Editor on top of the demo DVA and classifier, then an edit with it.
demo-s3editor: demo
	$(PY) -m s3jax.train --config configs/s3editor.py:demo --workdir $(DEMO)/s3editor
	$(PY) -m s3jax.edit --checkpoint $(DEMO) --input $(DEMO)/edit/sample_clip.mp4 \
	    --attribute Eyes_Open --strength 1.5 --steps 20 --blend feather --side-by-side \
	    --editor s3editor --s3editor $(DEMO)/s3editor --out $(DEMO)/edit/edited_s3editor.mp4

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) benchmarks/run_all.py

clean-demo:
	rm -rf $(DEMO) runs/data/sample
