"""The file MLflow logs as the model's code ("models from code"): it names the pyfunc class."""
from mlflow.models import set_model

from pokesprite.registry import SpriteModel

set_model(SpriteModel())
