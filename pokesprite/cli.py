"""The ``pokesprite`` command line.

    pokesprite data import [SOURCE]     validate and copy the raw dataset into data/
    pokesprite data stats               counts, image sizes, caption lengths, split sizes
    pokesprite train [--stage all|1|2|3|eval] ...   run the stages (as `dvc repro` does, without DVC)
    pokesprite generate PROMPT ...      draw sprites with a registered model (RGBA PNGs; --rgb)
    pokesprite serve [--model URI|DIR]  a web page to draw sprites (Gradio, http://127.0.0.1:7860)
    pokesprite models list              registered versions, their aliases and evaluation metrics
    pokesprite models promote VERSION   make a version the champion by hand
    pokesprite exp show                 DVC experiments: changed params and headline metrics, <= 120 columns
    pokesprite metrics show             the workspace's headline metrics against HEAD
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from pathlib import Path


def cmd_data_import(args) -> int:
    from pokesprite.data.raw import default_source, import_dataset

    source = Path(args.source) if args.source else default_source()
    records = import_dataset(source, args.dest)
    print(f"imported {len(records)} sprites from {source} into {args.dest}/")
    return 0


def cmd_data_stats(args) -> int:
    from pokesprite.config import load_params
    from pokesprite.data.preprocess import clean_caption, dataset_stats, split_numbers
    from pokesprite.data.raw import scan
    from pokesprite.models.text import load_tokenizer

    params = load_params(args.params)
    if not Path(args.data).exists():
        print(f"error: {args.data}/ does not exist: import the dataset first (pokesprite data import, or make data), "
              "or fetch it from the DVC remote (dvc pull data.dvc)", file=sys.stderr)
        return 2
    records = scan(Path(args.data))
    captions = [clean_caption(r.caption) for r in records]
    splits = split_numbers([r.number for r in records], params.data.split, params.seed)
    stats = dataset_stats(records, captions, splits, load_tokenizer(params.text.model), params.text.model)
    if args.json:
        print(json.dumps(stats, indent=2))
        return 0
    print(f"sprites: {stats['sprites']}  ({args.data}/)")
    print("image sizes: " + ", ".join(f"{k}: {v}" for k, v in stats["image_sizes"].items()))
    for key, label in (("caption_chars", "caption characters"), ("caption_tokens", "caption tokens")):
        s = stats[key]
        print(f"{label}: min {s['min']}, median {s['median']:g}, mean {s['mean']:g}, max {s['max']}")
    over = sum(1 for ids in load_tokenizer(params.text.model)(captions)["input_ids"]
               if len(ids) > params.text.max_tokens)
    print(f"captions longer than text.max_tokens={params.text.max_tokens}: {over}")
    print("split (seed {}): ".format(params.seed) + ", ".join(f"{k} {v}" for k, v in stats["splits"].items()))
    return 0


def stage_choices() -> tuple[str, ...]:
    """``all``, the stages' numbers (1/2/3/eval) and their names, from the stage table."""
    from pokesprite.stage_table import STAGES

    return ("all", *(s.number for s in STAGES.values() if s.number), *STAGES)


def stages_to_run(stage: str, resume_kind: str | None, layout) -> list[str]:
    """``all`` = every stage of the table; a number (1/2/3/eval = vae/diffusion/finetune/evaluate) or
    a name = that stage, after the unnumbered stages it reads (preprocess, alignment, reference)
    whose outputs are missing under ``layout``."""
    from pokesprite.stage_table import STAGES, stage_by_number, upstream

    if stage == "all":
        names = list(STAGES)
        if resume_kind is not None:  # continue the interrupted stage, then the ones after it
            names = names[names.index(resume_kind):]
        return names
    name = stage if stage in STAGES else stage_by_number(stage).name
    if resume_kind is not None and resume_kind != name:
        raise ValueError(f"--resume holds a {resume_kind} checkpoint but --stage {stage} is {name}")
    missing = [n for n in upstream(name)
               if STAGES[n].number is None and not all((layout.out / out).exists() for out in STAGES[n].outs)]
    return [*missing, name]


def cmd_train(args) -> int:
    import dataclasses
    import inspect

    from pokesprite import stages
    from pokesprite.config import load_params
    from pokesprite.stage_table import STAGES, prepare_run
    from pokesprite.checkpoints import load_checkpoint, require_weights

    params = load_params(args.config)
    if args.no_mlflow:
        os.environ["POKESPRITE_TRACKING"] = "off"
    if args.experiment_name:
        params = dataclasses.replace(params, mlflow=dataclasses.replace(params.mlflow,
                                                                        experiment=args.experiment_name))
    if args.data_stats:
        return cmd_data_stats(argparse.Namespace(params=args.config, data=str(Path(args.root) / "data"),
                                                 json=False))
    for flag, path in (("--vae-checkpoint", args.vae_checkpoint), ("--diffusion-checkpoint", args.diffusion_checkpoint),
                       ("--resume", args.resume)):
        if path and not Path(path).is_file():  # before any long work
            raise FileNotFoundError(f"{path}: no such checkpoint ({flag})")
    for path, kind, weights in ((args.vae_checkpoint, "vae", ("state_dict",)),
                                (args.diffusion_checkpoint, "diffusion", ("unet", "text_proj"))):
        if path:  # its kind, data only and weights (not a last.pt), before any long work
            require_weights(load_checkpoint(path, kind), path, *weights)
    resume_kind = None
    if args.resume:
        from pokesprite.checkpoints import read

        ckpt = read(args.resume)
        resume_kind = ckpt.get("kind") if isinstance(ckpt, dict) else None
        resumable = [s.name for s in STAGES.values() if s.resumable]
        if resume_kind not in resumable:
            kinds = ", ".join(resumable[:-1]) + " or " + resumable[-1]
            raise ValueError(f"{args.resume}: not a {kinds} checkpoint (kind {resume_kind!r})")
        if "train" not in ckpt:
            raise ValueError(f"{args.resume}: holds inference weights only; resume from last.pt or epoch_NNNN.pt")
        differences = stages.resume_differences(ckpt.get("stage_config"), resume_kind, params)
        if differences:  # a resumed run keeps the checkpoint's schedule (epochs, learning rate) and optimiser
            raise ValueError(f"{args.resume} was trained under other {resume_kind} settings than {args.config}:\n  "
                             + "\n  ".join(differences) + "\nA resume continues the same run (its epochs and "
                             "learning-rate schedule come from the checkpoint): set these back, or train "
                             "afresh without --resume. Only " + ", ".join(f"train.{k}" for k in stages.OPERATIONAL)
                             + " may change on a resume.")
    from pokesprite.train import distributed

    layout = stages.Layout(args.root, args.out)
    names = stages_to_run(args.stage, resume_kind, layout)
    stages.resolve_device(args.device)  # a wrong --device fails before any stage; under torchrun it joins the group
    if distributed.launched():  # every process runs what process 0 found missing
        names = distributed.broadcast(names)
        for name in names:  # before any long work
            if STAGES[name].resumable:
                distributed.check_batch(getattr(params, name).train.batch_size, f"{name}.train.batch_size")
    single = [n for n in names if not STAGES[n].parallel]
    if distributed.launched() and single:
        raise ValueError(f"under torchrun only the training stages run (alignment, vae, diffusion, finetune); "
                         f"run {', '.join(single)} first without torchrun: pokesprite train --stage {single[0]}")
    checkpoints = {"vae_checkpoint": args.vae_checkpoint, "diffusion_checkpoint": args.diffusion_checkpoint}
    results = {}
    for name in names:
        spec = STAGES[name]
        kw = {"root": args.root, "out": args.out, "device": args.device,
              "tags": {"entry_point": "pokesprite train"}}
        if name == resume_kind:
            kw["resume"] = Path(args.resume)
        elif spec.resumable and not (args.vae_checkpoint or args.diffusion_checkpoint):
            # An interrupted run of this stage under the same params, inputs and code continues;
            # otherwise its folder is cleared for a fresh start (both said in the log).
            kw["resume"] = prepare_run(name, params, layout, device=args.device)
        accepted = inspect.signature(spec.run).parameters
        kw.update({k: Path(v) for k, v in checkpoints.items() if v and k in accepted})
        if distributed.is_main():
            print(f"== {name} ==", flush=True)
        try:
            results[name] = spec.run(params, **kw)
        except KeyboardInterrupt:
            if spec.resumable:
                print(stages.resume_hint(name, spec.number, layout, params_file=args.config), file=sys.stderr)
            return 130
    if distributed.is_main():
        print(json.dumps(results, indent=2, default=str))
    return 0


def check_generate_args(args) -> str | None:
    """What is wrong with a ``generate`` request, checked before torch, MLflow or the model load (None:
    nothing).

    Limits come from ``diffusion.sample`` of ./params.yaml when it loads (else the defaults): a
    half-edited params.yaml does not stop drawing from a registered model, which checks the request
    against its own limits again.
    """
    import math

    from pokesprite.config import (MAX_PROMPT_CHARS, MAX_SEED, ConfigError, SampleConfig, ScheduleConfig,
                                   load_params, sampler_names)

    try:
        params = load_params("params.yaml") if Path("params.yaml").is_file() else None
    except ConfigError:
        params = None
    sample = params.diffusion.sample if params else SampleConfig()
    timesteps = params.diffusion.schedule.timesteps if params else ScheduleConfig().timesteps
    if not args.prompt.strip():
        return 'the prompt is empty; pass "" only through the served model, as the unconditional prompt'
    if len(args.prompt) > MAX_PROMPT_CHARS:
        return f"the prompt is {len(args.prompt)} characters long; at most {MAX_PROMPT_CHARS} are accepted"
    if not 1 <= args.n <= sample.max_sprites:
        return f"-n {args.n}: draw 1..{sample.max_sprites} sprites at a time (diffusion.sample.max_sprites)"
    if not 0 <= args.seed <= MAX_SEED - (args.n - 1):
        return f"--seed {args.seed}: must be in 0..{MAX_SEED - (args.n - 1)} (sprite i is drawn with seed + i)"
    if args.steps is not None and not 1 <= args.steps <= timesteps:
        return f"--steps {args.steps}: must be in 1..{timesteps}"
    if args.guidance is not None and not (math.isfinite(args.guidance) and args.guidance >= 0):
        return f"--guidance {args.guidance}: must be a finite number >= 0 (1 = no guidance)"
    if args.sampler and args.sampler not in sampler_names():
        return f"--sampler {args.sampler}: choose one of {', '.join(sampler_names())}"
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        return f"-o {out}: exists and is not a folder"
    parent = next(p for p in (out, *out.parents) if p.exists())
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"-o {out}: cannot write in {parent}"
    missing = [p for p in (out, *out.parents) if not p.exists()]  # deepest first
    try:  # access() says yes to root everywhere: making the folder is the real check ...
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return f"-o {out}: cannot make the folder ({e.strerror})"
    for p in missing:  # ... and it is made again once there are sprites to write
        p.rmdir()
    return None


def sprite_path(folder: Path, prompt: str, seed: int) -> Path:
    """``<first words of the prompt>_<seed>.png`` in ``folder``, never a file that exists: the same
    prompt and seed drawn again (another model, other settings) gets ``_<seed>-2.png``, ``-3``, ..."""
    import unicodedata

    text = unicodedata.normalize("NFKD", prompt).encode("ascii", "ignore").decode().lower()  # "é" -> "e"
    stem = ""
    for word in re.findall(r"[a-z0-9]+", text):  # whole words, at most 40 characters
        candidate = f"{stem}-{word}" if stem else word[:40]
        if len(candidate) > 40:
            break
        stem = candidate
    stem = stem or "sprite"
    path, k = folder / f"{stem}_{seed}.png", 2
    while path.exists():
        path, k = folder / f"{stem}_{seed}-{k}.png", k + 1
    return path


def cmd_generate(args) -> int:
    from pokesprite.images import parse_colour, save_image_atomic

    background = parse_colour(args.background, name="--background") if args.background else None
    problem = check_generate_args(args)  # before torch, MLflow and the model load
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    from PIL import Image

    from pokesprite.app import Request, ServeError, load_studio, sprite_notes

    try:
        studio = load_studio(args.model, device=args.device, background=background)
    except ServeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    pipe = studio.pipeline
    if args.n > pipe.sample.max_sprites:  # this model's own limit, which ./params.yaml may not know
        print(f"error: -n {args.n}: {studio.label} draws at most {pipe.sample.max_sprites} sprites per request",
              file=sys.stderr)
        return 2
    for note in pipe.truncation_notes([args.prompt]):  # drawn anyway, from the first tokens
        print(f"warning: {note.replace('prompt 0', 'the prompt', 1)}", file=sys.stderr)
    req = Request(args.prompt, args.seed, args.steps or pipe.sample.steps,
                  pipe.sample.guidance_scale if args.guidance is None else args.guidance, args.n,
                  args.sampler or pipe.sample.sampler, args.rgb)
    images = studio.draw(req)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)  # only now: a failed load leaves no empty folder behind
    for i, img in enumerate(images):
        path = sprite_path(out, args.prompt, args.seed + i)
        save_image_atomic(Image.fromarray(img), path, text=sprite_notes(req, i, studio.label))
        print(path)
    print(f"drew {len(images)} sprite(s) with {studio.label}: seeds {args.seed}..{args.seed + len(images) - 1}, "
          f"{req.steps} {req.sampler} steps, guidance {req.guidance:g} (each PNG's text notes hold its prompt and "
          "settings)",
          file=sys.stderr)
    return 0


def cmd_serve(args) -> int:
    from pokesprite.app import ServeError, serve
    from pokesprite.images import parse_colour

    background = parse_colour(args.background, name="--background") if args.background else None
    try:
        serve(args.model, host=args.host, port=args.port, device=args.device, background=background)
    except ServeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def _registered_model_missing(name: str, e) -> str:
    """The error for a ``--name`` that is not registered, naming the models that are."""
    import mlflow

    try:
        names = sorted(m.name for m in mlflow.MlflowClient().search_registered_models())
    except Exception:
        names = []
    where = f"no registered model {name!r} in {mlflow.get_tracking_uri()} ({e.error_code})"
    if names:
        return f"{where}; registered here: {', '.join(names)}"
    return f"{where}.\nRun the pipeline first (make repro)."


def cmd_models_list(args) -> int:
    import mlflow

    from pokesprite.registry import list_versions
    from pokesprite.tracking import configure_mlflow

    configure_mlflow(create=False)
    try:
        rows = list_versions(args.name)
    except mlflow.exceptions.MlflowException as e:
        print(f"error: {_registered_model_missing(args.name, e)}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    known = sorted({m for r in rows for m in r["metrics"]})
    unknown = [m for m in metrics if known and m not in known] if args.metrics != DEFAULT_LIST_METRICS else []
    if unknown:
        print(f"error: --metrics {','.join(unknown)}: no version has {'it' if len(unknown) == 1 else 'them'}; "
              f"choose from {', '.join(known)}", file=sys.stderr)
        return 2
    print(format_versions(rows, metrics))
    protocols = {r["eval_protocol"]: r["eval_protocol_desc"] for r in rows if r["eval_protocol"]}
    for fingerprint, description in protocols.items():
        print(f"protocol {fingerprint[:6]}: {description}")
    if len(protocols) > 1 or (protocols and any(not r["eval_protocol"] for r in rows)):
        print("Metrics measured under different protocols do not compare; the promotion rule compares only "
              "within one.")
    return 0


def cmd_models_promote(args) -> int:
    import mlflow

    from pokesprite.registry import promote
    from pokesprite.tracking import configure_mlflow

    configure_mlflow(create=False)
    try:
        done = promote(args.name, args.version)
    except mlflow.exceptions.MlflowException as e:
        if "RESOURCE_DOES_NOT_EXIST" not in str(e.error_code):
            raise
        from pokesprite.app import registry_hint

        print(f"error: no version {args.version} of {args.name!r}: {registry_hint(f'models:/{args.name}')}",
              file=sys.stderr)
        return 1
    if done["replaced"] is None and done["version"] == args.version:
        print(f"{args.name} version {args.version} is the champion")
    else:
        print(f"{args.name} version {args.version} is now the champion (was version {done['replaced']})")
    return 0


def cmd_models_show(args) -> int:
    import mlflow

    from pokesprite.registry import version_details
    from pokesprite.tracking import configure_mlflow

    configure_mlflow(create=False)
    shown = []
    for version in [args.version] + ([args.against] if args.against is not None else []):
        try:
            shown.append(version_details(args.name, version))
        except mlflow.exceptions.MlflowException as e:
            if e.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise
            from pokesprite.app import registry_hint

            what = f"version {version}" if str(version).isdigit() else f"alias @{version}"
            print(f"error: no {what} of {args.name!r}: {registry_hint(f'models:/{args.name}')}", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps(shown[0] if len(shown) == 1 else {"version": shown[0], "against": shown[1]}, indent=2))
    else:
        print(format_details(args.name, *shown))
    return 0


def created_at(row: dict) -> str:
    """A version's creation time (``list_versions``' milliseconds) as local date and minute, or ""."""
    import datetime as dt

    return dt.datetime.fromtimestamp(row["created"] / 1000).strftime("%Y-%m-%d %H:%M") if row["created"] else ""


def format_details(name: str, row: dict, other: dict | None = None) -> str:
    """One version for people: what it is, how it was promoted and evaluated, its lineage, every metric and
    every param; against ``other``, the metrics side by side and only the params that differ."""

    def created(r):
        return created_at(r) or "-"

    def commit(r):
        return (r["git_commit"][:8] or "-") + (" (uncommitted changes)" if r.get("git_dirty") == "true" else "")

    def num(x):
        return "-" if x is None else f"{x:.6g}"

    def table(rows):
        if not rows:
            return ["  (none)"]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        return ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]

    aliases = f" (@{', @'.join(row['aliases'])})" if row["aliases"] else ""
    lines = [f"{name} version {row['version']}{aliases}, created {created(row)}, commit {commit(row)}",
             f"  promotion: {row['promotion'] or '-'}",
             f"  evaluated: {row['eval_protocol_desc'] or 'protocol not recorded'}",
             f"  run:       {row['run_id'] or '-'}"]
    lines += [f"  {k}: {v}" for k, v in row["tags"].items()]
    if other is None:
        lines += ["", "metrics:"] + table([[k, num(v)] for k, v in row["metrics"].items()])
        lines += ["", f"params ({len(row['params'])}, as the evaluation saw them):"]
        lines += table([[k, v] for k, v in row["params"].items()])
        return "\n".join(lines)
    a, b = f"version {row['version']}", f"version {other['version']}"
    lines += ["", f"against {b}, created {created(other)}, commit {commit(other)}"]
    if row["eval_protocol"] != other["eval_protocol"]:
        lines.append(f"  evaluated differently: {other['eval_protocol_desc'] or 'protocol not recorded'}; "
                     "the metrics do not compare")
    lineage = sorted(set(row["tags"]) | set(other["tags"]))
    moved = [[k, row["tags"].get(k, "-"), other["tags"].get(k, "-")] for k in lineage
             if k.startswith(("data_", "dvc_lock.", "changed")) and row["tags"].get(k) != other["tags"].get(k)]
    if moved:
        lines += ["", "lineage that differs:"] + table([["tag", a, b], *moved])
    keys = list(row["metrics"]) + [k for k in other["metrics"] if k not in row["metrics"]]
    rows = [["metric", a, b, "change"]]
    for k in keys:
        x, y = row["metrics"].get(k), other["metrics"].get(k)
        rows.append([k, num(x), num(y), "" if x is None or y is None or num(x) == num(y) else f"{x - y:+.4g}"])
    lines += [""] + table(rows)
    names = sorted(set(row["params"]) | set(other["params"]))
    differ = [[k, row["params"].get(k, "-"), other["params"].get(k, "-")] for k in names
              if row["params"].get(k) != other["params"].get(k)]
    if differ:
        lines += ["", f"params that differ ({len(differ)} of {len(names)}):"] + table([["param", a, b], *differ])
    else:
        lines += ["", f"all {len(names)} params are equal"]
    return "\n".join(lines)


def format_versions(rows: list[dict], metrics: list[str]) -> str:
    """The registered versions as a plain-text table, newest first: aliases, metrics, the evaluation
    protocol's fingerprint (metrics compare only under one) and the commit (``*``: uncommitted changes)."""
    head = ["version", "aliases", "created", *metrics, "protocol", "commit"]
    table = [head]
    for r in rows:
        created = created_at(r)
        values = [f"{r['metrics'][m]:.4g}" if m in r["metrics"] else "-" for m in metrics]
        commit = (r["git_commit"][:8] or "-") + ("*" if r.get("git_dirty") == "true" else "")
        aliases = ",".join(r["aliases"]) or ("-" if r["promotion"] else "unfinished")  # no decision: killed mid-way
        table.append([str(r["version"]), aliases, created, *values,
                      r.get("eval_protocol", "")[:6] or "-", commit])
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


DEFAULT_LIST_METRICS = ("fid,kid,kid_std,recon_psnr,recon_ssim,stage3_scorer_r_precision,"
                        "independent_r_precision,text_sensitivity")


def port_number(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (1-65535)")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pokesprite", description="Text-to-sprite diffusion: data, training, drawing.")
    sub = p.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="import and inspect the dataset").add_subparsers(dest="data_command",
                                                                                       required=True)
    imp = data.add_parser("import", help="validate the raw dataset and copy it into data/ (tracked by data.dvc)")
    imp.add_argument("source", nargs="?", help="dataset folder or .zip (default: $POKESPRITE_DATA_SOURCE "
                                                "or ../shared/pokemon)")
    imp.add_argument("--dest", default="data", help="destination folder (default: data)")
    imp.set_defaults(func=cmd_data_import)

    st = data.add_parser("stats", help="print counts, image sizes, caption lengths and split sizes")
    st.add_argument("--data", default="data", help="raw dataset folder (default: data)")
    st.add_argument("--params", default="params.yaml", help="params file giving the seed, split and tokenizer")
    st.add_argument("--json", action="store_true", help="print the statistics as JSON")
    st.set_defaults(func=cmd_data_stats)

    from pokesprite.stage_table import STAGES

    tr = sub.add_parser(
        "train", help="train stages directly (the library functions `dvc repro` runs), e.g. on a GPU machine",
        description="Run the stages in order: all = " + ", ".join(STAGES) + ". Each stage finds the "
                    "previous stage's best checkpoint under outputs/; explicit paths override. Runs are logged to "
                    "MLflow and TensorBoard like `dvc repro`.")
    tr.add_argument("--config", default="params.yaml", help="params file (default: params.yaml; "
                                                             "profiles/gpu.yaml is the full GPU schedule)")
    tr.add_argument("--stage", choices=stage_choices(), default="all",
                    help="all, or 1 = VAE, 2 = diffusion, 3 = text-encoder fine-tuning, eval = evaluation, or a "
                         "stage's name (default: all)")
    tr.add_argument("--experiment-name", help="MLflow experiment to log to (default: mlflow.experiment of the config)")
    tr.add_argument("--vae-checkpoint", help="VAE checkpoint for stages 2 and 3 (default: outputs/vae/best.pt)")
    tr.add_argument("--diffusion-checkpoint",
                    help="diffusion checkpoint for stage 3 (default: outputs/diffusion/best.pt)")
    tr.add_argument("--resume", help="continue a stage from its last.pt or epoch_NNNN.pt (with --stage all, "
                                     "the later stages follow)")
    tr.add_argument("--data-stats", action="store_true", help="print the dataset statistics and exit")
    tr.add_argument("--device", default=None, help="auto (default: CUDA if present), cpu, cuda, cuda:1, ...")
    tr.add_argument("--root", default=".", help="project folder holding data/ and outputs/ (default: .)")
    tr.add_argument("--out", help="write outputs/, metrics/, plots/, runs/ and tb/ here instead of under --root")
    tr.add_argument("--no-mlflow", action="store_true",
                    help="log to TensorBoard and the metrics/plots files only; register nothing "
                         "(for a machine without the project's MLflow store)")
    tr.set_defaults(func=cmd_train)

    gen = sub.add_parser("generate", help="draw sprites from a text prompt with a registered model",
                         description="Draw sprites of one prompt as PNGs (RGBA: the background keyed to "
                                     "transparency). Each PNG's text notes record its prompt, seed, model and "
                                     "sampler settings.")
    gen.add_argument("prompt", help='what to draw, e.g. "a small green creature with a bulb on its back"')
    gen.add_argument("-n", type=int, default=4,
                     help="number of sprites, 1..diffusion.sample.max_sprites (64) (default: 4)")
    gen.add_argument("--seed", type=int, default=0,
                     help="seed of the first sprite; sprite i is drawn with seed + i, so -n 1 --seed 5 redraws "
                          "the sixth sprite of -n 8 --seed 0 (default: 0)")
    gen.add_argument("--steps", type=int, help="sampling steps, 1..1000 (default: the model's own)")
    gen.add_argument("--guidance", type=float,
                     help="classifier-free guidance scale, 1 = none (default: the model's own)")
    gen.add_argument("--sampler", help="a sampler of pokesprite.diffusion.samplers, e.g. ddim (default: the "
                     "model's own)")
    gen.add_argument("-o", "--out", default="out",
                     help="output folder (default: out/); files are named <prompt's first words>_<seed>.png and "
                          "never overwritten")
    gen.add_argument("--model", default="models:/pokesprite@champion",
                     help="MLflow model URI (models:/pokesprite/2, models:/pokesprite@challenger) or a saved "
                          "pipeline folder, e.g. outputs/finetune/model (default: models:/pokesprite@champion)")
    gen.add_argument("--device", default=None, help="auto (default: CUDA if present), cpu, cuda, cuda:1, ...")
    gen.add_argument("--rgb", action="store_true",
                     help="save RGB PNGs on the background (default: RGBA, the background keyed to transparency)")
    gen.add_argument("--background", help="the colour the model draws on, made transparent: '#rrggbb' or 'R,G,B' "
                                           "(default: the model's own, data.background; white)")
    gen.set_defaults(func=cmd_generate)

    srv = sub.add_parser("serve", help="a web page that draws sprites from a prompt (Gradio)",
                         description="Load a model once and serve a page on which to type a prompt, pick seed, "
                                     "sampling steps, guidance and the number of sprites, and download the PNGs.")
    srv.add_argument("--model", default="models:/pokesprite@champion",
                     help="MLflow model URI or a saved pipeline folder, e.g. outputs/finetune/model "
                          "(default: models:/pokesprite@champion)")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    srv.add_argument("--port", type=port_number, default=7860, help="port, 1-65535 (default: 7860)")
    srv.add_argument("--device", default=None, help="auto (default: CUDA if present), cpu, cuda, cuda:1, ...")
    srv.add_argument("--background", help="the colour the model draws on, made transparent: '#rrggbb' or 'R,G,B' "
                                           "(default: the model's own, data.background; white)")
    srv.set_defaults(func=cmd_serve)

    models = sub.add_parser("models", help="the registered model's versions").add_subparsers(
        dest="models_command", required=True)
    ls = models.add_parser("list", help="versions, aliases (champion, challenger) and evaluation metrics",
                           description="Print every registered version with its aliases, evaluation metrics and "
                                       "git commit, newest first. The champion is the version users load "
                                       "(models:/pokesprite@champion).")
    ls.add_argument("--name", default="pokesprite", help="registered model name (default: pokesprite)")
    ls.add_argument("--metrics", default=DEFAULT_LIST_METRICS,
                    help=f"comma-separated metric columns (default: {DEFAULT_LIST_METRICS})")
    ls.add_argument("--json", action="store_true",
                    help="print the versions as JSON, with every metric, tag and the promotion decision")
    ls.set_defaults(func=cmd_models_list)
    pr = models.add_parser("promote", help="make a version the champion by hand",
                           description="Give VERSION the champion alias (what generate, serve and "
                                       "models:/pokesprite@champion load), whatever the promotion rule said: "
                                       "e.g. after the evaluation protocol changed, when versions are not "
                                       "compared automatically.")
    pr.add_argument("version", type=int, help="the version number (pokesprite models list)")
    pr.add_argument("--name", default="pokesprite", help="registered model name (default: pokesprite)")
    pr.set_defaults(func=cmd_models_promote)
    sh = models.add_parser("show", help="one version: lineage, promotion, every metric and param; --against "
                                        "another to compare",
                           description="Print one registered version: its aliases, commit, why it was or was not "
                                       "promoted, how it was evaluated, its lineage (data and stage hashes), every "
                                       "metric and every param. With --against, the two versions' metrics side by "
                                       "side and the params that differ.")
    sh.add_argument("version", nargs="?", default="champion",
                    help="a version number or an alias (default: champion)")
    sh.add_argument("--against", metavar="VERSION", help="compare with this version number or alias")
    sh.add_argument("--name", default="pokesprite", help="registered model name (default: pokesprite)")
    sh.add_argument("--json", action="store_true", help="print the version(s) as JSON")
    sh.set_defaults(func=cmd_models_show)
    from pokesprite.experiments import add_parsers as add_experiment_parsers

    add_experiment_parsers(sub)
    return p


def main(argv=None) -> int:
    from pokesprite import gc_settings, malloc_settings

    gc_settings.for_commands()
    malloc_settings.for_commands()
    args = build_parser().parse_args(argv)
    level = logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING  # torchrun: one speaks
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if getattr(args, "n", 1) < 1:
        print("error: -n must be at least 1", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except Exception as e:  # the error types are imported only now: a quick refusal needs no torch
        from pokesprite.config import ConfigError
        from pokesprite.data.raw import DatasetError
        from pokesprite.train.stability import TrainingDiverged

        if isinstance(e, (ConfigError, DatasetError, FileNotFoundError, ValueError)):
            print(f"error: {e}", file=sys.stderr)
            return 2
        if isinstance(e, TrainingDiverged):
            print(f"error: {e}", file=sys.stderr)
            return 3
        raise


if __name__ == "__main__":
    sys.exit(main())
