# One-command entry points. Each creates ./.venv (or $VENV) and installs first.
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO := runs/demo

.PHONY: install sample-data demo-dva demo-classifier demo-id-standin demo demo-s3editor test test-fast bench clean-demo

$(VENV)/.installed: setup.py
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	# The PyTorch LPIPS, the oracle of tests/test_metrics.py, without its torchvision (no
	# build of it imports with this CPU torch; the test stands in for the two trunks).
	$(PY) -m pip install --quiet --no-deps lpips==0.1.4
	touch $@

install: $(VENV)/.installed

# Compiled XLA programs are cached here so the later demo steps reuse them.
export JAX_COMPILATION_CACHE_DIR ?= $(CURDIR)/runs/.jax_cache

# The demo, step by step: each target makes one thing; training targets resume
# (and finish at once when their run is complete).
SAMPLE := runs/data/sample

sample-data: install
	$(PY) -m data_prep.sample --out $(SAMPLE) --size 64

demo-dva: sample-data
	$(PY) -m s3jax.train --config configs/voxceleb.py:demo --workdir $(DEMO)

demo-classifier: demo-dva
	$(PY) -m s3jax.train --config configs/celebahq_classifier.py:demo --workdir $(DEMO)/classifier \
	    --config.dva_workdir=$(DEMO)

demo-id-standin: sample-data
	$(PY) -m s3jax.train --config configs/id_standin.py:demo --workdir $(DEMO)/id_standin \
	    --config.data.data_dir=$(SAMPLE)

# Train the demo DVA on the embedded sample, then the demo attribute classifier,
# then edit a held-out sample clip with it (input | edit side by side).
demo: demo-dva demo-classifier
	$(PY) -m data_prep.sample --clip $(DEMO)/edit/sample_clip.mp4 --frames 24
	$(PY) -m s3jax.edit --checkpoint $(DEMO) --input $(DEMO)/edit/sample_clip.mp4 \
	    --attribute Mouth_Wide --strength 1.5 --steps 20 --blend feather --side-by-side \
	    --out $(DEMO)/edit/edited.mp4
	@echo "demo outputs: $(DEMO)/samples/, $(DEMO)/classifier/classifier.json, $(DEMO)/edit/"

# S3Editor on top of the demo DVA, classifier and identity stand-in; then an edit with it
# next to the plain edit (input | plain | S3Editor) and the comparison table of both
# ($(DEMO)/s3editor/comparison.json: locality outside the target regions, faithfulness,
# identity preservation, mean and 95% interval over the sample's test videos).
demo-s3editor: demo demo-id-standin
	$(PY) -m s3jax.train --config configs/s3editor.py:demo --workdir $(DEMO)/s3editor \
	    --config.dva_workdir=$(DEMO) --config.classifier_dir=$(DEMO)/classifier \
	    --config.idnet_dir=$(DEMO)/id_standin --config.data.data_dir=$(SAMPLE)
	$(PY) -m s3jax.edit --checkpoint $(DEMO) --input $(DEMO)/edit/sample_clip.mp4 \
	    --attribute Eyes_Open --strength 1.5 --steps 20 --blend feather --compare-plain \
	    --editor s3editor --s3editor $(DEMO)/s3editor --out $(DEMO)/edit/edited_s3editor.mp4
	$(PY) -m s3jax.evaluate --config configs/eval.py:s3editor_demo \
	    --workdir $(DEMO)/s3editor/eval --config.checkpoints="('$(DEMO)',)" \
	    --config.classifier=$(DEMO)/classifier --config.data.data_dir=$(SAMPLE) \
	    --config.editors="('plain', '$(DEMO)/s3editor')"
	cp $(DEMO)/s3editor/eval/comparison.json $(DEMO)/s3editor/comparison.json
	@sed -n '/## Methods compared/,$$p' $(DEMO)/s3editor/eval/summary.md
	@echo "S3Editor demo outputs: $(DEMO)/edit/edited_s3editor.comparison.mp4, $(DEMO)/s3editor/comparison.json"

# Test files are spread over TEST_WORKERS processes (pytest-xdist, a file's tests stay in one
# worker so its module fixtures compile once); 0 runs them in this process.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

test: install
	$(PYTEST)

# Skips the tests marked `slow` (> ~15 s each); CI runs everything (`make test`).
test-fast: install
	$(PYTEST) -m "not slow"

bench: install
	$(PY) benchmarks/run_all.py

clean-demo:
	rm -rf $(DEMO) runs/data/sample
