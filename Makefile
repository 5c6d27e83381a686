# The README's two commands: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev

.PHONY: demo test lint venv clean demo-s3

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m workflows.demo

# the demo against the local stack (infra/local): outputs on the S3 server, MLflow server, Ray head
demo-s3: $(STAMP)
	$(BIN)/python -m infra.local.stack run --state-dir .stack -- \
		$(BIN)/python -m workflows.demo --set output=s3://residual-ad/demo/runs

lint: $(STAMP)
	$(BIN)/ruff check residual_core workflows tests benchmarks infra

test: lint
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) .demo .stack mlruns mlflow.db
