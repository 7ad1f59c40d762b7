# dlm-kernels: `make test` and `make demo` are the quick start; both install into .venv first.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
TRITON ?= triton==3.6.0
# Builds take a lock so that parallel `make` calls never compile into the same build/ at once.
LOCK := flock $(VENV)/.build.lock
PYTEST_ARGS ?=

.PHONY: venv install build test bench lint demo clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch first (from the local wheel cache where there is one), then the build and test tools,
# then the package itself built against that torch.
$(VENV)/.deps: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q "$(TORCH)" "$(TRITON)" "setuptools>=77" wheel
	# numpy<2.3: triton 3.6's interpreter converts 1-element arrays with int(), an error in
	# numpy 2.3+ ("only 0-dimensional arrays can be converted"), which breaks every loop bound.
	$(BIN)/pip install -q "numpy<2.3" scipy pytest pytest-benchmark ruff ninja "pybind11>=2.12" \
		safetensors tqdm matplotlib transformers tokenizers
	# The lm-eval harness (about 480 MB with datasets/pyarrow/pandas) so that the adapter's
	# end-to-end test runs in CI instead of being skipped.
	$(BIN)/pip install -q "numpy<2.3" "lm_eval>=0.4"
	touch $@

venv: $(VENV)/.deps

# The extension is rebuilt only when its sources or the build files change (an editable install
# serves Python edits directly); a full compile costs minutes on 2 cores.
BUILT := $(VENV)/.built
$(BUILT): $(VENV)/.deps setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h)
	$(LOCK) $(BIN)/pip install -q --no-build-isolation --no-deps -e .
	touch $@

build: $(BUILT)

install: build

# pytest's exit code 5 (no test collected) is a failure here, not a pass.
test: build
	$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

# CPU suite at the issues' CPU goal shapes -> benchmarks/results/cpu-<date>.{json,md} + PNGs,
# then the goal cases under pytest-benchmark -> benchmarks/results/cpu-<date>-pytest.json.
bench: build
	$(BIN)/python -m benchmarks.run --device cpu --budget 380  # about 8 min with the ceilings and plots
	$(BIN)/python -m benchmarks.plot benchmarks/results/cpu-$$(date +%F).json
	$(BIN)/python -m pytest benchmarks/pytest_suite.py -q -p no:cacheprovider \
	  --benchmark-group-by=group --benchmark-columns=min,median,max,rounds \
	  --benchmark-max-time=1 --benchmark-min-rounds=3 \
	  --benchmark-json=benchmarks/results/cpu-$$(date +%F)-pytest.json  # about 1 min

lint: $(VENV)/.deps
	$(BIN)/ruff check dlm_kernels dlm tests benchmarks setup.py
	$(BIN)/ruff format --check dlm_kernels dlm tests benchmarks setup.py

# The main job: train the tiny preset on the embedded Shakespeare corpus (CPU, < 10 min on 2
# cores), print the validation ELBO and a few samples; checkpoint, metrics and loss.png go to
# runs/demo/. Each run starts afresh and overwrites runs/demo/ (--force).
demo: build
	$(BIN)/dlm train --preset shakespeare-tiny --out runs/demo --force
	$(BIN)/dlm sample --checkpoint runs/demo/checkpoint.safetensors --prompt "ROMEO:" \
		--prompt "KING HENRY:" --length 160 --steps 160 --block-length 32 \
		--alg low_confidence --temperature 0.7 --top-p 0.9

clean:
	rm -rf build dist *.egg-info dlm_kernels/*.so .pytest_cache $(BUILT)
