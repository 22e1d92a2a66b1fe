# kinoray — `make run` and `make test` work on a fresh machine: they create .venv and install first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= outputs

export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED ?= 0
export RAY_DATA_DISABLE_PROGRESS_BARS ?= 1
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_DISABLE_TELEMETRY ?= 1

.PHONY: install run test test-fast serve bench lint clean

install: $(BIN)/.installed

# PyPI's Linux torch wheel is the CUDA build (with several GB of nvidia-* packages). For a
# CPU-only machine: make install TORCH_INDEX=https://download.pytorch.org/whl/cpu
# For GPUs, the CUDA build that matches the driver, e.g. TORCH_INDEX=https://download.pytorch.org/whl/cu128
TORCH_INDEX ?=

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(if $(TORCH_INDEX),$(BIN)/pip install --quiet 'torch==2.13.0' --index-url $(TORCH_INDEX))
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

run: install
	$(BIN)/kinoray batch examples/prompts.jsonl --output $(OUT)/run --config examples/job.yaml
	@echo "outputs: $(OUT)/run/videos/ (one file per row) and $(OUT)/run/manifest/ (Parquet)"

test: install
	$(BIN)/python -m pytest -q -ra --durations=12

# The lane without Ray: request contract, stages, families, tables, API parsing (~1 minute).
test-fast: install
	$(BIN)/python -m pytest -q -ra -m "not integration and not slow"

serve: install
	$(BIN)/kinoray serve --config examples/serve.yaml

bench: install
	$(BIN)/kinoray bench --out $(OUT)/bench

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

clean:
	rm -rf $(OUT) .pytest_cache
