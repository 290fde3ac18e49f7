"""Experiment tracking behind one small interface.

``Tracker`` keeps metrics in memory only (tests, quick runs); ``MlflowTracker`` also writes them to
the active MLflow run. Tracking defaults to a sqlite database under ``mlruns/`` with artifacts
beside it; ``MLFLOW_TRACKING_URI`` overrides it (a server, another database).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

STORE_DIR = "mlruns"


def tracking_enabled() -> bool:
    """False when ``$POKESPRITE_TRACKING`` is ``off``: stages then log to TensorBoard and files only."""
    value = os.environ.get("POKESPRITE_TRACKING", "mlflow").strip().lower()
    if value not in ("mlflow", "off"):
        raise ValueError(f"POKESPRITE_TRACKING must be mlflow or off, got {value!r}")
    return value == "mlflow"


def default_tracking_uri(root: Path | None = None) -> str:
    root = Path(root or Path.cwd()).resolve()
    return f"sqlite:///{root / STORE_DIR / 'mlflow.db'}"


def configure_mlflow(root: Path | None = None) -> str:
    """Point MLflow at ``$MLFLOW_TRACKING_URI`` or the project's ``mlruns/mlflow.db``; return the URI."""
    import mlflow

    uri = os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(root)
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def ensure_experiment(name: str, root: Path | None = None) -> str:
    """Create ``name`` with its artifacts under ``mlruns/artifacts`` (not the sqlite default ./mlartifacts)."""
    import mlflow

    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    uri = mlflow.get_tracking_uri()
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri[len("sqlite:///"):]).parent / "artifacts").resolve().as_uri()
    return mlflow.create_experiment(name, artifact_location=location)


class Tracker:
    """Collects per-epoch metrics in memory and, given ``tensorboard_dir``, writes TensorBoard events.

    Per-step scalars (loss, learning rate, gradient norm) go to TensorBoard only; per-epoch metrics
    and images go everywhere. Subclasses also send them to an experiment tracker.
    """

    def __init__(self, tensorboard_dir: Path | None = None):
        self.history: dict[str, list[tuple[int, float]]] = {}
        self.tensorboard_dir = tensorboard_dir
        self._writer = None

    @property
    def writer(self):
        if self._writer is None and self.tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.tensorboard_dir), flush_secs=30)
        return self._writer

    def log_params(self, params: dict) -> None:
        pass

    def log_step(self, scalars: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for k, v in scalars.items():
                self.writer.add_scalar(k, float(v), step)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for k, v in metrics.items():
            self.history.setdefault(k, []).append((step, float(v)))
            if self.writer is not None:
                self.writer.add_scalar(f"epoch/{k}", float(v), step)

    def log_image(self, image, name: str) -> None:
        if self.writer is not None:
            import numpy as np

            self.writer.add_image(name.rsplit(".", 1)[0], np.asarray(image.convert("RGB")), dataformats="HWC")

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        pass


class MlflowTracker(Tracker):
    """Writes to the currently active MLflow run."""

    def log_params(self, params: dict) -> None:
        import mlflow

        mlflow.log_params({k: str(v)[:500] for k, v in params.items()})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        import mlflow

        super().log_metrics(metrics, step)
        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if math.isfinite(float(v))}, step=step)

    def log_image(self, image, name: str) -> None:
        import mlflow

        super().log_image(image, name)
        mlflow.log_image(image, name)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        import mlflow

        mlflow.log_artifact(str(path), artifact_path)

