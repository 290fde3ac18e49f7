"""The combined model as an MLflow pyfunc, its registration and aliases.

The logged model carries the pipeline folder (weights, configs, the fine-tuned text encoder and
its tokenizer) and the ``pokesprite`` package source, so loading it needs neither the network nor
a checkout of this repository:

    model = mlflow.pyfunc.load_model("models:/pokesprite@champion")
    images = model.predict(["a small green creature with a bulb on its back"], params={"seed": 0})
    # images: (N, 215, 215, 3) uint8
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

import mlflow
from mlflow.models import infer_signature

import pokesprite

CHAMPION = "champion"
EXAMPLE_PROMPTS = ["a small green creature with a bulb on its back"]
RUNTIME_PACKAGES = ["torch", "torchvision", "transformers", "numpy", "pandas", "pillow", "tqdm", "pyyaml"]


def requirements() -> list[str]:
    """The model's pip requirements, pinned to the versions it was trained with."""
    from importlib.metadata import version

    return [f"{name}=={version(name).split('+')[0]}" for name in RUNTIME_PACKAGES]


def prompts_from_input(model_input) -> list[str]:
    """Accept a list of strings, a single string, a pandas Series/DataFrame (first column) or an array."""
    import pandas as pd

    if isinstance(model_input, str):
        return [model_input]
    if isinstance(model_input, pd.DataFrame):
        col = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
        model_input = model_input[col]
    prompts = [str(p) for p in list(model_input)]
    if not prompts:
        raise ValueError("no prompts given")
    return prompts


class SpriteModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper around ``SpritePipeline``: prompts in, (N, 215, 215, 3) uint8 sprites out.

    ``predict`` has no type hints on purpose: MLflow would then replace the logged signature, whose
    params schema (seed, num_steps) is what lets callers pass sampling options.
    """

    def load_context(self, context):
        import torch

        from pokesprite.pipeline import SpritePipeline

        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.pipeline = SpritePipeline.load(Path(context.artifacts["pipeline"]), device=device)

    def predict(self, context, model_input, params=None):
        params = params or {}
        return self.pipeline(prompts_from_input(model_input), seed=int(params.get("seed", 0)),
                             num_steps=params.get("num_steps"), guidance_scale=params.get("guidance_scale"),
                             sampler=params.get("sampler"))


def log_model(pipeline_dir: Path, *, registered_model_name: str | None = None, name: str = "model"):
    """Log the pipeline folder as a pyfunc model to the active run (and register it when a name is given).

    The signature's params (seed, num_steps, guidance_scale, sampler) default to the pipeline's own
    sampling settings, so callers override only what they want.
    """
    from pokesprite.pipeline import SpritePipeline

    sample = SpritePipeline.sample_defaults(pipeline_dir)
    defaults = {"seed": 0, "num_steps": sample.steps, "guidance_scale": sample.guidance_scale,
                "sampler": sample.sampler}
    example_out = np.zeros((1, 215, 215, 3), dtype=np.uint8)
    signature = infer_signature(EXAMPLE_PROMPTS, example_out, params=defaults)
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=str(Path(__file__).with_name("mlflow_model.py")),  # "models from code": no pickle
        artifacts={"pipeline": str(pipeline_dir)},
        code_paths=[str(Path(pokesprite.__file__).parent)],
        signature=signature,
        input_example=(EXAMPLE_PROMPTS, {"seed": 0, "num_steps": 2}),  # checked by a real predict at log time
        pip_requirements=requirements(),
        registered_model_name=registered_model_name,
    )


def set_champion_if_none(name: str, version: str | int) -> bool:
    """Give ``version`` the alias ``champion`` when the registered model has no champion yet."""
    client = mlflow.MlflowClient()
    aliases = client.get_registered_model(name).aliases
    if CHAMPION in aliases:
        return False
    client.set_registered_model_alias(name, CHAMPION, str(version))
    return True
