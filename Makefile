# The two commands a newcomer needs: `make demo` and `make test`. Both set up what they need.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup test lint typecheck check bench privacy demo clean wheelhouse images compose-demo

setup:
	bash scripts/setup.sh

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: setup
	$(VENV)/bin/mypy

check: lint typecheck test

bench: setup
	$(PY) bench/transport.py --write-docs
	$(PY) bench/split_overhead.py --write-docs
	$(PY) bench/round_time.py --write-docs
	$(PY) bench/data_loading.py --write-docs
	$(PY) bench/inference.py --write-docs
	$(PY) bench/startup.py --write-docs
	$(PY) bench/checkpoint.py --write-docs
	$(PY) bench/chaos.py --write-docs
	$(PY) bench/fuzz.py --write-docs
	$(PY) bench/flood.py --write-docs
	$(PY) bench/robust_aggregation.py --write-docs
	$(PY) bench/site_cost.py --write-docs
	$(PY) bench/reassembly_memory.py --write-docs
	$(PY) bench/containers.py --write-docs
	$(PY) bench/observability.py --write-docs
	$(PY) bench/vertical.py --write-docs


# What a curious aggregator learns in each mode, and what each defense costs (docs/privacy.md).
privacy: setup
	$(VENV)/bin/medsplit privacy --config experiments/configs/privacy-breast-cancer.yaml --write-docs
	$(VENV)/bin/medsplit privacy --config experiments/configs/privacy-cxr.yaml --write-docs
	$(VENV)/bin/medsplit privacy --config experiments/configs/vertical-breast-cancer.yaml --write-docs
	$(VENV)/bin/medsplit privacy --config experiments/configs/privacy-tail-1.yaml
	$(VENV)/bin/medsplit privacy --config experiments/configs/privacy-tail-2.yaml

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis build *.egg-info

demo: setup
	$(VENV)/bin/medsplit demo --mode split-u --orchestration sequential --sites 3 --dataset breast-cancer

# Containers (docs/deployment.md). The wheelhouse is what an air-gapped host needs to build the
# images: `make wheelhouse` where PyPI is reachable, copy it, `make images OFFLINE=1` there.
wheelhouse: setup
	bash scripts/wheelhouse.sh

images: setup
	bash scripts/images.sh

compose-demo: images
	$(PY) -m experiments.compose_demo --out runs/compose-demo
