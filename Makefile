# pokesprite: `make repro` trains the whole pipeline, `make test` runs the test suite.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Dataset to import when data/ is absent (a folder or a .zip of the same layout).
POKESPRITE_DATA_SOURCE ?= ../shared/pokemon

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 180
export POKESPRITE_DATA_SOURCE
# DVC stage commands call `python`: make it the project's venv.
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: install data repro test ui mlflow-server

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e ".[dev]"
	touch $@

# Import the raw dataset if needed, then check it is exactly the version recorded in data.dvc.
data: install
	@test -d data || $(BIN)/pokesprite data import "$(POKESPRITE_DATA_SOURCE)"
	@mkdir -p .dvc/tmp && cp data.dvc .dvc/tmp/data.dvc.expected
	@$(BIN)/dvc commit --force --quiet data.dvc
	@if ! cmp -s data.dvc .dvc/tmp/data.dvc.expected; then \
		cp .dvc/tmp/data.dvc.expected data.dvc; \
		echo "error: data/ does not match the dataset recorded in data.dvc."; \
		echo "Remove data/ and run 'make data' again, or, to adopt a new dataset version, 'dvc add data' and commit data.dvc."; \
		exit 1; \
	fi
	@$(BIN)/dvc status data.dvc

# One Prefect server for the whole run (flows/server.py), not a temporary one per stage.
repro: data
	$(BIN)/python -m flows.server -- $(BIN)/dvc repro

# Two worker processes, each given whole test files (a file's module fixtures are built once), the
# slow files first (tests/conftest.py); TEST_WORKERS=0 runs the suite in this process.
TEST_WORKERS ?= 2
test: install
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# Prefect UI on :4200, MLflow UI on :5000 and TensorBoard on :6006 (Ctrl-C stops all three).
ui: install
	@echo "Prefect UI: http://127.0.0.1:4200   MLflow UI: http://127.0.0.1:5000   TensorBoard: http://127.0.0.1:6006"
	@echo "(MLflow opens in its GenAI view: flip the sidebar to \"Model training\" once and it stays.)"
	@trap 'kill 0' INT TERM; \
	$(BIN)/prefect server start --host 127.0.0.1 --port 4200 & \
	$(BIN)/tensorboard --logdir tb --host 127.0.0.1 --port 6006 & \
	$(BIN)/mlflow ui --host 127.0.0.1 --port 5000 \
		--backend-store-uri sqlite:///$(CURDIR)/mlruns/mlflow.db \
		--default-artifact-root $(CURDIR)/mlruns/artifacts & \
	wait

# A shared MLflow server for a team: runs and the model registry in PostgreSQL, artifacts stored and
# served by the server (clients need no access to its disk). Point the stages at it with
#   export MLFLOW_TRACKING_URI=http://<this host>:5000
# (No comment after a value on its line: make would keep the spaces before it in the value.)
# MLFLOW_DB: postgresql://user:password@host:port/database
MLFLOW_DB        ?= postgresql://mlflow:change-me@127.0.0.1:5432/mlflow
MLFLOW_ARTIFACTS ?= $(CURDIR)/mlflow-server-artifacts
MLFLOW_HOST      ?= 127.0.0.1
MLFLOW_PORT      ?= 5000
# MLFLOW_ALLOWED_HOSTS: the Host headers clients send, e.g. mlflow-host:5000,mlflow-host (MLflow's
# default: localhost and private IPs); needed with MLFLOW_HOST=0.0.0.0 and a host name.
MLFLOW_ALLOWED_HOSTS ?=
mlflow-server: install
	$(BIN)/mlflow server --host $(MLFLOW_HOST) --port $(MLFLOW_PORT) --backend-store-uri "$(MLFLOW_DB)" \
		--serve-artifacts --artifacts-destination "$(MLFLOW_ARTIFACTS)" \
		$(if $(MLFLOW_ALLOWED_HOSTS),--allowed-hosts "$(MLFLOW_ALLOWED_HOSTS)")
