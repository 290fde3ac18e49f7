"""pokesprite: text-to-image latent diffusion for Pokemon sprites."""
import os

# Everything runs offline: weights come from installed packages, never from a hub; no telemetry.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

__version__ = "0.1.0"
