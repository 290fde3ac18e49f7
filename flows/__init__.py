"""Prefect flows that run the pokesprite stages. Thin: every task calls one pokesprite.stages function."""
import os

# Offline-friendly defaults; anything already set in the environment wins.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "pokesprite")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
