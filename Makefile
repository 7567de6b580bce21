# Every target creates .venv when it is missing. CUDA users: make TORCH_SPEC="torch" (or any pip spec).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test lint format demo bench bench-4096 bench-7b clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# pytest exits 5 when it collected nothing: say so and fail, never count it as a pass.
test: lint
	$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; fi; exit $$rc

demo: $(STAMP)
	$(BIN)/python -m safelora_cli.demo

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

# Width 4096 (the Llama-2-7B layer), 4 layers: safelora against its I/O floors (~10 min).
bench-4096: $(STAMP)
	$(BIN)/python bench/scale_bench.py --layers 4 --json bench/results/scale-4.json

# Opt-in, never in CI: a full-depth synthetic Llama-2-7B pair (2 x 13.5 GB bf16, ~60 GB free
# disk under BENCH7B_WORK), one repeat, page cache not warmed; RSS compared with bench-4096's.
BENCH7B_WORK ?= /tmp/safelora-bench-7b
bench-7b: $(STAMP)
	$(BIN)/python bench/scale_bench.py --layers 32 --repeats 1 --no-warm --work $(BENCH7B_WORK) \
		$(if $(wildcard bench/results/scale-4.json),--compare bench/results/scale-4.json) \
		--json bench/results/scale-32.json

clean:
	rm -rf demo .pytest_cache build *.egg-info
