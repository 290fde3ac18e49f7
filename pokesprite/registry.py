"""The combined model as an MLflow pyfunc, its registration and aliases.

The logged model carries the pipeline folder (weights, configs, the fine-tuned text encoder and
its tokenizer) and the ``pokesprite`` package source, so loading it needs neither the network nor
a checkout of this repository:

    model = mlflow.pyfunc.load_model("models:/pokesprite@champion")
    images = model.predict(["a small green creature with a bulb on its back"], params={"seed": 0})
    # images: (N, 215, 215, 3) uint8 on the background colour
    pngs = model.predict(["a blue turtle"], params={"format": "png"})
    # pngs: one base64-encoded RGBA PNG per prompt, the background keyed to transparency
"""
from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd

import mlflow
from mlflow.environment_variables import MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT, _MLFLOW_IS_IN_SERVING_ENVIRONMENT
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from mlflow.types import DataType

import pokesprite
from pokesprite.images import WHITE, key_background, parse_colour, png_base64

CHAMPION = "champion"
EXAMPLE_PROMPTS = ["a small green creature with a bulb on its back"]
RUNTIME_PACKAGES = ["torch", "torchvision", "transformers", "numpy", "pandas", "pillow", "tqdm", "pyyaml", "scipy"]
FORMATS = ("array", "png")  # the ``format`` request param
SPRITE_PARAMS = ("seed", "num_steps", "guidance_scale", "sampler", "format", "rgb", "background")
log = logging.getLogger(__name__)


def requirements() -> list[str]:
    """The model's pip requirements, pinned to the versions it was trained with."""
    from importlib.metadata import version

    return [f"{name}=={version(name).split('+')[0]}" for name in RUNTIME_PACKAGES]


def serving_deadline() -> float | None:
    """Under ``mlflow models serve``, when the server gives up on a request (it answers 504 after
    ``MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT`` seconds, 60 by default, but cannot stop the model): the
    drawing stops there too instead of computing on for nobody. None elsewhere."""
    if not _MLFLOW_IS_IN_SERVING_ENVIRONMENT.get():
        return None
    return time.monotonic() + MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.get()


def prompts_from_input(model_input) -> list[str]:
    """Accept a list of strings, a single string, a pandas Series/DataFrame (first column) or an array."""
    import pandas as pd

    if isinstance(model_input, str):
        return [model_input]
    if isinstance(model_input, pd.DataFrame):
        col = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
        model_input = model_input[col]
    prompts = list(model_input)
    if not prompts:
        raise ValueError("no prompts given")
    for i, p in enumerate(prompts):  # numbers or nulls are a caller's mistake, not prompts "1" or "None"
        if not isinstance(p, str):
            raise ValueError(f"prompt {i} is {type(p).__name__} {p!r}, not text")
    return prompts


def encode_sprites(images: np.ndarray, *, fmt: str = "array", rgb: bool = False,
                   background: tuple[int, int, int] = WHITE):
    """(N, 215, 215, 3) uint8 sprites -> the answer for ``format``.

    ``array``: the sprites unchanged. ``png``: one base64 PNG string per sprite, RGBA with the
    background keyed to transparency (``images.key_background``), or RGB when ``rgb`` is true.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}: the request param format must be one of {', '.join(FORMATS)}")
    if fmt == "array":
        return images
    return [png_base64(img if rgb else key_background(img, background)) for img in images]


def reject_unknown_params(params, schema) -> None:
    """Raise a 400-style ``MlflowException`` naming every request param the schema does not define."""
    if not isinstance(params, dict) or schema is None:
        return
    known = {p.name for p in schema.params}
    if unknown := sorted(str(k) for k in params if str(k) not in known):
        raise MlflowException.invalid_parameter_value(
            f"unknown request param(s) {', '.join(unknown)}; this model accepts {', '.join(sorted(known))}")


def _install_unknown_param_check() -> None:
    """Make unknown request params an error for this model's schema.

    MLflow 3.17's schema enforcement (``mlflow.models.utils._enforce_params_schema``, which
    ``PyFuncModel.predict`` and the scoring server call before the model sees anything) drops
    params missing from the schema with only a log warning, so a typo such as ``"seeds"`` would
    quietly draw with seed 0. This wraps that function, for params schemas holding exactly
    ``SPRITE_PARAMS`` only, so that such a request gets HTTP 400 naming the param; other models
    in the process are untouched. Idempotent.
    """
    import mlflow.pyfunc as pyfunc_module

    enforce = getattr(pyfunc_module, "_enforce_params_schema", None)
    if enforce is None or getattr(enforce, "pokesprite_checks_unknown", False):
        return

    def enforce_known_params(params, schema):
        if schema is not None and {p.name for p in schema.params} == set(SPRITE_PARAMS):
            reject_unknown_params(params, schema)
        return enforce(params, schema)

    enforce_known_params.pokesprite_checks_unknown = True
    pyfunc_module._enforce_params_schema = enforce_known_params


def _install_text_input_check() -> None:
    """Refuse served prompts that are not text before MLflow turns them into text.

    ``mlflow models serve`` parses a JSON ``inputs`` (or ``instances``) list against the model's
    string input schema into a string array before the model sees it, so ``[1, 2.5, null]`` would
    arrive as the prompts "1", "2.5" and "None". This wraps the server's parser (for a schema of one
    string column only) to check the raw list with ``prompts_from_input`` first: HTTP 400 naming the
    prompt. Idempotent.
    """
    try:
        from mlflow.pyfunc import scoring_server
    except ImportError:  # the serving extras are absent: nothing parses JSON in this process
        return
    parse = getattr(scoring_server, "infer_and_parse_data", None)
    if parse is None or getattr(parse, "pokesprite_checks_text", False):
        return

    def parse_text_prompts(data, schema=None):
        if schema is not None and schema.input_types() == [DataType.string] and isinstance(data, dict):
            for key in ("inputs", "instances"):
                if isinstance(data.get(key), list):
                    try:
                        prompts_from_input(data[key])
                    except ValueError as e:
                        raise MlflowException.invalid_parameter_value(str(e)) from None
        return parse(data, schema)

    parse_text_prompts.pokesprite_checks_text = True
    scoring_server.infer_and_parse_data = parse_text_prompts


class SpriteModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper around ``SpritePipeline``: prompts in, sprites out.

    Request params (all optional; the logged signature holds their defaults): ``seed``,
    ``num_steps``, ``guidance_scale``, ``sampler``; ``format`` = ``array`` ((N, 215, 215, 3) uint8)
    or ``png`` (base64 PNG strings, RGBA unless ``rgb`` is true); ``background`` = the colour the
    model draws on (``#rrggbb`` or ``R,G,B``), which keying makes transparent. A bad or unknown
    param raises ``MlflowException`` (INVALID_PARAMETER_VALUE: HTTP 400 from ``mlflow models serve``).

    ``predict``'s input is typed ``pd.DataFrame``, which is what pyfunc hands it (the logged signature's
    one string column turns a list of prompts into a one-column frame); MLflow infers no schema from
    that type, so it keeps the logged signature, whose params schema is what lets callers pass these
    options (a type it could infer from would replace it). ``load_model(uri, model_config={"device":
    "cuda:1"})`` picks the device (default: CUDA when present, else the CPU).
    """

    def load_context(self, context):
        import torch

        from pokesprite.pipeline import SpritePipeline

        _install_unknown_param_check()
        _install_text_input_check()
        device = (context.model_config or {}).get("device") or "auto"
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.pipeline = SpritePipeline.load(Path(context.artifacts["pipeline"]), device=device)

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None):
        from pokesprite.pipeline import DrawingTimeout

        params = params or {}
        try:
            fmt = str(params.get("format") or "array")
            encode_sprites(np.zeros((0, 1, 1, 3), np.uint8), fmt=fmt)  # a bad format fails before drawing
            background = parse_colour(params.get("background") or WHITE)
            prompts = prompts_from_input(model_input)
            limit = self.pipeline.sample.max_sprites
            if len(prompts) > limit:
                raise ValueError(f"{len(prompts)} prompts: this model draws at most {limit} sprites per request")
            for note in self.pipeline.truncation_notes(prompts):  # drawn anyway, from the first tokens
                log.warning(note)
            images = self.pipeline(prompts, seed=int(params.get("seed", 0)),
                                   num_steps=params.get("num_steps"), guidance_scale=params.get("guidance_scale"),
                                   sampler=params.get("sampler"), deadline=serving_deadline())
        except ValueError as e:  # bad params or prompts: the caller's to fix
            raise MlflowException.invalid_parameter_value(str(e)) from e
        except DrawingTimeout as e:  # the server has answered 504 already; this frees the worker
            log.warning("%s after %s s (MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT)", e,
                        MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.get())
            raise MlflowException(str(e)) from e
        except Exception as e:  # ours to fix, not the caller's: HTTP 500 (MLflow would answer 400)
            log.exception("drawing failed")
            raise MlflowException(f"drawing failed: {type(e).__name__}: {e}") from e
        return encode_sprites(images, fmt=fmt, rgb=bool(params.get("rgb", False)), background=background)


def log_model(pipeline_dir: Path, *, registered_model_name: str | None = None, name: str = "model",
              background: tuple[int, int, int] = WHITE):
    """Log the pipeline folder as a pyfunc model to the active run (and register it when a name is given).

    The signature's params (``SPRITE_PARAMS``) default to the pipeline's own sampling settings,
    arrays, RGBA and ``background`` (the training background, ``data.background``), so callers
    override only what they want.
    """
    from pokesprite.pipeline import SpritePipeline

    sample = SpritePipeline.sample_defaults(pipeline_dir)
    defaults = {"seed": 0, "num_steps": sample.steps, "guidance_scale": sample.guidance_scale,
                "sampler": sample.sampler, "format": "array", "rgb": False,
                "background": "#{:02x}{:02x}{:02x}".format(*parse_colour(background))}
    assert tuple(defaults) == SPRITE_PARAMS
    example_out = np.zeros((1, 215, 215, 3), dtype=np.uint8)
    signature = infer_signature(EXAMPLE_PROMPTS, example_out, params=defaults)
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=str(Path(__file__).with_name("mlflow_model.py")),  # "models from code": no pickle
        artifacts={"pipeline": str(pipeline_dir)},
        code_paths=[str(Path(pokesprite.__file__).parent)],
        signature=signature,
        model_config={"device": "auto"},  # logged, so that load_model(model_config={"device": ...}) is honoured
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
        return False, f"KID {kid:.6g} is not below the champion's {champ_kid:.6g}"
    if align < champ_align - alignment_tolerance:
        return False, (f"KID {kid:.6g} < {champ_kid:.6g}, but text alignment {align:.3f} is more than "
                       f"{alignment_tolerance} below the champion's {champ_align:.3f}")
    return True, f"KID {kid:.6g} < {champ_kid:.6g} and text alignment {align:.3f} vs {champ_align:.3f}"


PROTOCOL_TAG = "eval_protocol"  # fingerprint of how a version was evaluated (evaluation.evaluate.protocol)
PROTOCOL_DESC_TAG = "eval_protocol_desc"


def protocol_mismatch(protocol: dict | None, champion) -> str | None:
    """Why ``champion``'s metrics cannot be compared with those of a version evaluated under ``protocol``
    (``{"fingerprint": ..., "description": ...}``), or None when they can: KID and R-precision
    measured on other captions, sampler settings or KID subsets are other numbers."""
    mine = (protocol or {}).get("fingerprint")
    tags = champion.tags or {}
    theirs = tags.get(PROTOCOL_TAG)
    if mine == theirs:
        return None
    how = f"another protocol ({tags.get(PROTOCOL_DESC_TAG, theirs)})" if theirs else "an unrecorded protocol"
    this = (protocol or {}).get("description", "unrecorded")
    return (f"not compared: champion version {champion.version} was evaluated under {how}, this version under "
            f"{this}; `pokesprite models promote VERSION` makes a version the champion")


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
    """The version that holds ``champion``, or None when the model or the alias does not exist yet.

    Any other registry error (a server that is down, a locked database) is raised, not read as "no
    champion": that would promote the next version without comparing it with anything."""
    client = mlflow.MlflowClient()
    try:
        model = client.get_registered_model(name)
    except mlflow.exceptions.MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    version = (model.aliases or {}).get(CHAMPION)
    return client.get_model_version(name, str(version)) if version is not None else None


RETRY_TAG = "prefect_flow_run_id"  # a lineage tag: the same value on a retried stage's attempts


def registered_by_earlier_attempt(name: str, lineage: dict):
    """The version that an earlier attempt of the same Prefect flow run registered, or None.

    Prefect retries a failed evaluate task within its flow run; when the failure came after
    registration, the retry must not register the same model a second time."""
    run_id = lineage.get(RETRY_TAG)
    if not run_id:
        return None
    found = [v for v in mlflow.MlflowClient().search_model_versions(f"name='{name}'")
             if (v.tags or {}).get(RETRY_TAG) == str(run_id)]
    return max(found, key=lambda v: int(v.version), default=None)


FINGERPRINT_TAG = "model_fingerprint"  # the same model, logged the same way, has the same one


def model_fingerprint(pipeline_dir: Path, background: tuple[int, int, int]) -> str:
    """A hash of the pipeline folder's files (names and bytes) and of the background the served model keys."""
    h = hashlib.sha256()
    for path in sorted(p for p in Path(pipeline_dir).rglob("*") if p.is_file()):
        h.update(path.relative_to(pipeline_dir).as_posix().encode() + b"\0")
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    h.update(repr(tuple(background)).encode())
    return h.hexdigest()[:16]


def unfinished_version(name: str, fingerprint: str):
    """The newest version of this model whose registration was cut short (killed before its metrics and
    promotion were recorded), or None: a rerun finishes it instead of registering the model again."""
    found = [v for v in mlflow.MlflowClient().search_model_versions(f"name='{name}'")
             if (v.tags or {}).get(FINGERPRINT_TAG) == fingerprint and "promotion" not in (v.tags or {})]
    return max(found, key=lambda v: int(v.version), default=None)


def record_evaluation(name: str, version: str, metrics: dict, protocol: dict | None) -> None:
    """The metrics (``metric.*`` tags) and the evaluation protocol on a version."""
    client = mlflow.MlflowClient()
    for k, v in metrics.items():
        if isinstance(v, (int, float)):  # repr: the exact float, so that a tie compares as a tie
            client.set_model_version_tag(name, version, f"{METRIC_TAG}{k}", repr(float(v)))
    if protocol:
        client.set_model_version_tag(name, version, PROTOCOL_TAG, protocol["fingerprint"])
        client.set_model_version_tag(name, version, PROTOCOL_DESC_TAG, protocol["description"])


def register_evaluated(pipeline_dir: Path, name: str, metrics: dict, lineage: dict, *,
                       alignment_tolerance: float, background: tuple[int, int, int],
                       protocol: dict | None = None) -> dict:
    """Log and register the pipeline in the active run, tag it, and give it ``champion`` or ``challenger``.

    ``background`` is the colour the sprites were composited onto for training (``data.background``):
    the served model keys it to transparency. ``protocol`` (``{"fingerprint", "description"}``) says
    how the metrics were measured: a champion measured otherwise is not compared (``protocol_mismatch``)
    and keeps its alias. A retry of the same Prefect flow run (``RETRY_TAG`` in ``lineage``) finishes
    the version its earlier attempt registered instead of adding another, and so does any later run of
    the same model after a registration that was killed before its promotion was decided."""
    client = mlflow.MlflowClient()
    champion = current_champion(name)  # before this version exists
    fingerprint = model_fingerprint(pipeline_dir, background)
    earlier = registered_by_earlier_attempt(name, lineage)
    unfinished = unfinished_version(name, fingerprint) if earlier is None else None
    if earlier is not None:
        version = str(earlier.version)
        log.info("version %s of %s was registered by an earlier attempt of this flow run: finishing it",
                 version, name)
        if champion is not None and str(champion.version) == version:  # and promoted: decided already
            return {"version": int(version), "alias": CHAMPION,
                    "reason": (earlier.tags or {}).get("promotion", "promoted by an earlier attempt")}
    elif unfinished is not None:
        version = str(unfinished.version)
        log.info("version %s of %s holds this model but its registration did not finish: finishing it", version, name)
        for k, v in lineage.items():  # this run's lineage (its flow run, its dvc.lock)
            client.set_model_version_tag(name, version, k, str(v))
        if champion is not None and str(champion.version) == version:  # promoted before the kill: not against itself
            record_evaluation(name, version, metrics, protocol)
            why = "promoted by a run that was killed before it recorded why"
            client.set_model_version_tag(name, version, "promotion", why)
            return {"version": int(version), "alias": CHAMPION, "reason": why}
    else:
        info = log_model(pipeline_dir, background=background)
        version = str(mlflow.register_model(info.model_uri, name,  # lineage from the start
                                            tags={**lineage, FINGERPRINT_TAG: fingerprint}).version)
    record_evaluation(name, version, metrics, protocol)
    champion_metrics = version_metrics(champion) if champion else None
    mismatch = protocol_mismatch(protocol, champion) if champion_metrics and "kid" in champion_metrics else None
    promote, why = (False, mismatch) if mismatch else beats(metrics, champion_metrics,
                                                            alignment_tolerance=alignment_tolerance)
    alias = CHAMPION if promote else CHALLENGER
    client.set_registered_model_alias(name, alias, version)
    client.set_model_version_tag(name, version, "promotion", why)
    if champion is not None and promote:
        client.set_model_version_tag(name, str(champion.version), "replaced_by", version)
    return {"version": int(version), "alias": alias, "reason": why}


def promote(name: str, version: int) -> dict:
    """Give ``version`` the champion alias by hand (the promotion rule aside), noting it on the version;
    returns {"version", "replaced"}: the version that held the alias, or None."""
    client = mlflow.MlflowClient()
    target = client.get_model_version(name, str(version))  # raises for a missing version
    old = current_champion(name)
    if old is not None and str(old.version) == str(target.version):
        return {"version": int(version), "replaced": None}
    client.set_registered_model_alias(name, CHAMPION, str(version))
    if str((client.get_registered_model(name).aliases or {}).get(CHALLENGER)) == str(version):
        client.delete_registered_model_alias(name, CHALLENGER)
    client.set_model_version_tag(name, str(version), "promotion", "promoted by hand (pokesprite models promote)")
    if old is not None:
        client.set_model_version_tag(name, str(old.version), "replaced_by", str(version))
    return {"version": int(version), "replaced": int(old.version) if old is not None else None}


def _aliases(client, name: str) -> dict[str, list[str]]:
    """Version number (a string) -> its aliases."""
    aliases: dict[str, list[str]] = {}
    for alias, version in client.get_registered_model(name).aliases.items():
        aliases.setdefault(str(version), []).append(alias)
    return aliases


def _row(v, aliases: dict[str, list[str]]) -> dict:
    tags = v.tags or {}
    return {"version": int(v.version), "aliases": sorted(aliases.get(str(v.version), [])),
            "created": v.creation_timestamp, "metrics": version_metrics(v),
            "git_commit": tags.get("git_commit", ""), "git_dirty": tags.get("git_dirty", ""),
            "eval_protocol": tags.get(PROTOCOL_TAG, ""), "eval_protocol_desc": tags.get(PROTOCOL_DESC_TAG, ""),
            "promotion": tags.get("promotion", ""), "run_id": v.run_id}


def list_versions(name: str) -> list[dict]:
    """Every version of ``name``, newest first: version, aliases, creation time, metrics, commit, promotion."""
    client = mlflow.MlflowClient()
    aliases = _aliases(client, name)
    rows = [_row(v, aliases) for v in client.search_model_versions(f"name='{name}'")]
    return sorted(rows, key=lambda r: -r["version"])


def version_details(name: str, version: int | str) -> dict:
    """One version as ``list_versions`` gives it, plus its other tags (lineage: the data's and each stage's
    DVC hashes, the Prefect flow run, what params.yaml changed against the commit) and the params of
    the run that registered it (every ``params.yaml`` value the evaluation saw).

    ``version`` is a number or an alias (``champion``)."""
    client = mlflow.MlflowClient()
    v = (client.get_model_version(name, str(version)) if str(version).isdigit()
         else client.get_model_version_by_alias(name, str(version)))
    row = _row(v, _aliases(client, name))
    shown = {"git_commit", "git_dirty", PROTOCOL_TAG, PROTOCOL_DESC_TAG, "promotion"}
    row["tags"] = {k: t for k, t in sorted((v.tags or {}).items()) if not k.startswith(METRIC_TAG) and k not in shown}
    row["params"] = dict(sorted(client.get_run(v.run_id).data.params.items())) if v.run_id else {}
    return row
