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


CHALLENGER = "challenger"
METRIC_TAG = "metric."  # model-version tags holding the evaluation metrics


def beats(candidate: dict, champion: dict | None, *, alignment_tolerance: float) -> tuple[bool, str]:
    """The promotion rule: does ``candidate`` take the champion alias from ``champion``?

    Yes when there is no champion (or it was never evaluated); otherwise only when the candidate's
    KID is lower and its independent-scorer R-precision is at most ``alignment_tolerance`` below the
    champion's. Returns the decision and a sentence saying why.
    """
    if not champion or "kid" not in champion:
        return True, "no evaluated champion yet"
    kid, champ_kid = float(candidate["kid"]), float(champion["kid"])
    align = float(candidate["independent_r_precision"])
    champ_align = float(champion.get("independent_r_precision", float("-inf")))
    if kid >= champ_kid:
        return False, f"KID {kid:.4f} is not below the champion's {champ_kid:.4f}"
    if align < champ_align - alignment_tolerance:
        return False, (f"KID {kid:.4f} < {champ_kid:.4f}, but text alignment {align:.3f} is more than "
                       f"{alignment_tolerance} below the champion's {champ_align:.3f}")
    return True, f"KID {kid:.4f} < {champ_kid:.4f} and text alignment {align:.3f} vs {champ_align:.3f}"


def version_metrics(version) -> dict[str, float]:
    """The evaluation metrics stored as ``metric.*`` tags on a model version."""
    out = {}
    for k, v in (version.tags or {}).items():
        if k.startswith(METRIC_TAG):
            try:
                out[k[len(METRIC_TAG):]] = float(v)
            except ValueError:
                pass
    return out


def current_champion(name: str):
    client = mlflow.MlflowClient()
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except mlflow.exceptions.MlflowException:
        return None


def register_evaluated(pipeline_dir: Path, name: str, metrics: dict, lineage: dict, *,
                       alignment_tolerance: float) -> dict:
    """Log and register the pipeline in the active run, tag it, and give it ``champion`` or ``challenger``."""
    client = mlflow.MlflowClient()
    champion = current_champion(name)  # before this version exists
    info = log_model(pipeline_dir, registered_model_name=name)
    version = str(info.registered_model_version)
    for k, v in metrics.items():
        if isinstance(v, (int, float)):
            client.set_model_version_tag(name, version, f"{METRIC_TAG}{k}", f"{float(v):.6g}")
    for k, v in lineage.items():
        client.set_model_version_tag(name, version, k, v)
    promote, why = beats(metrics, version_metrics(champion) if champion else None,
                         alignment_tolerance=alignment_tolerance)
    alias = CHAMPION if promote else CHALLENGER
    client.set_registered_model_alias(name, alias, version)
    client.set_model_version_tag(name, version, "promotion", why)
    if champion is not None and promote:
        client.set_model_version_tag(name, champion.version, "replaced_by", version)
    return {"version": int(version), "alias": alias, "reason": why,
            "previous_champion": int(champion.version) if champion else None}


def list_versions(name: str) -> list[dict]:
    """Every version of ``name``, newest first: version, aliases, creation time, metrics, commit, promotion."""
    client = mlflow.MlflowClient()
    aliases: dict[str, list[str]] = {}
    for alias, version in client.get_registered_model(name).aliases.items():
        aliases.setdefault(str(version), []).append(alias)
    rows = []
    for v in client.search_model_versions(f"name='{name}'"):
        rows.append({"version": int(v.version), "aliases": sorted(aliases.get(str(v.version), [])),
                     "created": v.creation_timestamp, "metrics": version_metrics(v),
                     "git_commit": (v.tags or {}).get("git_commit", ""),
                     "promotion": (v.tags or {}).get("promotion", ""), "run_id": v.run_id})
    return sorted(rows, key=lambda r: -r["version"])
