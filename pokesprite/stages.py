"""The pipeline stages as the DVC stages, Prefect tasks and CLI all run them.

Each ``run_*`` function fixes the project layout (where a stage reads and writes), opens one MLflow
run, calls the stage's pure function and writes the stage's metrics (and per-epoch plots) for DVC:

    data/                        raw dataset (DVC-tracked by data.dvc)
    outputs/preprocess/          composited sprites, index.csv, stats.json
    outputs/alignment/model.pt   the CLIP-style image-text scorer stage 3 optimises against
    outputs/vae/best.pt          VAE checkpoint (+ latent scale); last.pt, epoch_NNNN.pt to resume
    outputs/diffusion/best.pt    U-Net + text projection checkpoint (EMA weights); last.pt, epoch_NNNN.pt
    outputs/finetune/model/      the combined model (pipeline.pt + text_encoder/)
    outputs/reference/           Inception features of the real sprites, the independent scorer
    outputs/evaluate/            the evaluation's sample grid and generated sprites
    tb/<stage>/<time>_<run>/     TensorBoard events of each run, kept across runs (`tensorboard --logdir tb`)
    outputs/evaluate/guidance_curve.csv  KID and R-precision per guidance scale (header only without scales)
    metrics/<stage>.json         final metrics of each stage (`dvc metrics show`): only what the inputs
                                 determine, so two runs of one commit write the same file
    runs/<stage>.json            facts of the last run, not tracked: wall time, host, registered version
    plots/<stage>.csv            per-epoch metrics of each training stage (`dvc plots show`)

``POKESPRITE_TRACKING=off`` (``pokesprite train --no-mlflow``) skips MLflow: metrics, plots and
TensorBoard are still written, nothing is registered. For machines without the project's store.

Which stages exist, what params each reads and what it writes is the table in ``stage_table.py``.
A training stage's ``resume=`` continues from a checkpoint; ``stage_table.prepare_run`` says whether
a run may continue from the ``last.pt`` an interrupted run or a failed attempt left (same params,
inputs and code).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING

from pokesprite.config import Params, flatten, to_dict
from pokesprite.files import write_text_atomic
from pokesprite.tracking import (MlflowTracker, Tracker, start_stage_run, store_lock, tensorboard_run_dir,
                                 tracking_enabled)

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


class Layout:
    """Where each stage reads and writes: ``root`` holds data/; ``out`` (default: root) the rest."""

    def __init__(self, root: str | Path = ".", out: str | Path | None = None):
        self.root = Path(root)
        self.out = Path(out) if out is not None else self.root
        self.raw = self.root / "data"
        outputs = self.out / "outputs"
        self.processed = outputs / "preprocess"
        self.reference_dir = outputs / "reference"
        self.alignment_dir = outputs / "alignment"
        self.vae_dir = outputs / "vae"
        self.diffusion_dir = outputs / "diffusion"
        self.finetune_dir = outputs / "finetune"
        self.evaluate_dir = outputs / "evaluate"
        self.metrics = self.out / "metrics"
        self.plots = self.out / "plots"
        self.runs = self.out / "runs"

    @property
    def vae_checkpoint(self) -> Path:
        return self.vae_dir / "best.pt"

    @property
    def diffusion_checkpoint(self) -> Path:
        return self.diffusion_dir / "best.pt"

    @property
    def alignment_model(self) -> Path:
        return self.alignment_dir / "model.pt"

    def stage_dir(self, stage: str) -> Path:
        """outputs/<stage>: where each stage writes (stage_table's ``outs``)."""
        return self.out / "outputs" / stage

    def tensorboard(self, stage: str, run_id: str | None = None) -> Path:
        """A new folder for this run's events: tb/<stage>/<time>[_<DVC experiment>][_<run id>], outside
        the stage's DVC output (which DVC empties before each run), so every run stays in TensorBoard."""
        return tensorboard_run_dir(self.out, stage, run_id)

    @property
    def model_dir(self) -> Path:
        return self.finetune_dir / "model"


def resolve_device(name: str | None = None) -> torch.device:
    """``auto`` (the default, or $POKESPRITE_DEVICE) picks CUDA when present, else the CPU. A name
    torch does not know, or CUDA on a machine without it, is a ValueError that names it.

    On CUDA, float32 matrix products may use TF32 tensor cores (``set_float32_matmul_precision("high")``).
    ``cudnn.benchmark`` stays off: on an H200 it did not speed up the VAE step (277.8 against 277.7
    sprites/s, reports/gpu/throughput.json), while every new shape (a last short batch, the
    evaluation's batch sizes, one-sprite grids) pays for timing each convolution's algorithms again.

    Under ``torchrun`` ``auto`` is this process's GPU (cuda:$LOCAL_RANK), and the process joins the
    process group (``pokesprite.train.distributed``). ``POKESPRITE_DETERMINISTIC=1`` makes CUDA runs
    repeat themselves bit for bit (deterministic kernels only, and cuBLAS's fixed workspace; slower).
    """
    import torch  # here, not at the top: the CLI and the stage table import this module cheaply

    from pokesprite.train import distributed

    name = name or os.environ.get("POKESPRITE_DEVICE", "auto")
    auto = distributed.local_device() or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = auto if name == "auto" else torch.device(name)
    except RuntimeError as e:  # torch's message lists the device types it knows
        raise ValueError(f"device {name!r} (--device or $POKESPRITE_DEVICE): {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} (--device or $POKESPRITE_DEVICE): this machine has no CUDA device; "
                         "use cpu or auto")
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    if os.environ.get("POKESPRITE_DETERMINISTIC") == "1":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts
        torch.use_deterministic_algorithms(True)
    distributed.setup(device)
    return device


def is_main_process() -> bool:
    """True outside ``torchrun`` and in its process 0 (the one that writes files and logs)."""
    return int(os.environ.get("RANK", "0")) == 0


def write_metrics(path: Path, metrics: dict) -> None:
    write_text_atomic(path, json.dumps(metrics, indent=2, sort_keys=True) + "\n")


def write_plot(path: Path, history: dict[str, list[tuple[int, float]]], columns: tuple[str, ...] = ()) -> None:
    """Per-epoch metrics as one CSV row per epoch (``dvc plots show`` draws them). With no epochs
    the file is written only when ``columns`` (the curves drawn from it) are given: a header, so
    that a stage that trained nothing still writes the plot DVC expects of it."""
    epochs = sorted({step for series in history.values() for step, _ in series})
    if not epochs and not columns:
        return
    names = sorted({*history, *columns})
    table = {name: dict(history.get(name, ())) for name in names}
    lines = [",".join(["epoch", *names])]
    lines += [",".join([str(e), *(f"{table[n][e]:.6g}" if e in table[n] else "" for n in names)]) for e in epochs]
    write_text_atomic(path, "\n".join(lines) + "\n")


def stage_params(params: Params, keys: tuple[str, ...]) -> dict:
    """The values of params.yaml ``keys`` (sections or dotted sub-keys), flattened as MLflow params:
    ("seed", "evaluate.seed", "text") -> {"seed": 0, "evaluate.seed": 0, "text.model": ..., "text.dim": ...}."""
    def plain(value):  # as to_dict writes a section: tuples as lists
        if dataclasses.is_dataclass(value):
            return to_dict(value)
        return [plain(v) for v in value] if isinstance(value, (list, tuple)) else value

    values = {}
    for key in keys:
        value = params
        for part in key.split("."):
            value = getattr(value, part)
        values[key] = plain(value)
    return flatten(values)


@contextlib.contextmanager
def stage_run(stage: str, params: Params, layout: Layout, tags: dict | None):
    """One MLflow run for one stage, in the project's store even inside DVC's temporary experiment
    workspace, named "<stage> · <DVC experiment>", with lineage and experiment tags and the params the
    stage table lists for it and for every stage upstream of it (tracking.start_stage_run); with
    tracking off, a plain TensorBoard tracker and no run. Per-epoch metrics go to plots/<stage>.csv
    at the end."""
    from pokesprite.stage_table import CURVES, STAGES, upstream  # the table imports this module's functions

    keys = tuple(k for name in (*upstream(stage), stage) for k in STAGES[name].params)
    plot = layout.plots / f"{stage}.csv"
    columns = tuple(y for curve in CURVES if curve.file == f"plots/{stage}.csv" for y in curve.y)
    if not is_main_process():  # under torchrun, process 0 alone logs and writes
        yield Tracker(), None
        return
    if not tracking_enabled():
        tracker = Tracker(tensorboard_dir=layout.tensorboard(stage))
        try:
            yield tracker, None
        finally:
            tracker.close()
            write_plot(plot, tracker.history, columns)
        return
    with start_stage_run(stage, params, layout.root, tags, logged=stage_params(params, keys)) as run:
        tracker = MlflowTracker(tensorboard_dir=layout.tensorboard(stage, run.info.run_id))
        try:
            yield tracker, run
        finally:
            tracker.close()
            write_plot(plot, tracker.history, columns)


def _finish(stage: str, metrics: dict, layout: Layout, started: float, facts: dict | None = None) -> dict:
    """Write the stage's metrics (what its inputs determine: metrics/<stage>.json, tracked by DVC and git)
    and the run's facts (wall time, host, registry outcome: runs/<stage>.json, untracked), log both to
    MLflow, and return both."""
    if not is_main_process():
        return metrics
    facts = {**(facts or {}), "wall_seconds": round(time.perf_counter() - started, 1), "host": socket.gethostname()}
    both = {**metrics, **facts}
    if tracking_enabled():
        import mlflow

        mlflow.log_metrics({f"final_{k}": float(v) for k, v in both.items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool)})
    write_metrics(layout.metrics / f"{stage}.json", metrics)
    write_metrics(layout.runs / f"{stage}.json", facts)
    log.info("%s done in %.0f s: %s", stage, facts["wall_seconds"], metrics)
    return both


def run_preprocess(params: Params, *, root: str | Path = ".", out: str | Path | None = None,
                   tags: dict | None = None, device=None) -> dict:
    """Composite, split and index the raw sprites (on the CPU: ``device`` is accepted and unused)."""
    from pokesprite.data.preprocess import preprocess, preview_grid
    from pokesprite.models.text import load_tokenizer

    layout, started = Layout(root, out), time.perf_counter()
    with stage_run("preprocess", params, layout, tags) as (tracker, _):
        stats = preprocess(params.data, raw_dir=layout.raw, out_dir=layout.processed, seed=params.seed,
                           tokenizer=load_tokenizer(params.text.model), tokenizer_name=params.text.model)
        tracker.log_image(preview_grid(layout.processed), "sprites_train_val_test.png")
        tracker.log_artifact(layout.processed / "stats.json")
        metrics = {"sprites": stats["sprites"], **{f"{k}_size": v for k, v in stats["splits"].items()},
                   "caption_chars_median": stats["caption_chars"]["median"]}
        if "caption_tokens" in stats:
            metrics["caption_tokens_median"] = stats["caption_tokens"]["median"]
        return _finish("preprocess", metrics, layout, started)


def run_alignment(params: Params, *, root: str | Path = ".", out: str | Path | None = None,
                  tags: dict | None = None, device=None) -> dict:
    """Train the CLIP-style scorer of stage 3 on the training split (skipped with a user CLIP checkpoint)."""
    import torch

    from pokesprite.data.dataset import SpriteDataset
    from pokesprite.models.alignment import CLIP_RECORD, clip_checkpoint_record, load_alignment
    from pokesprite.train.alignment import train_alignment

    layout, started = Layout(root, out), time.perf_counter()
    cfg = params.finetune.alignment
    with stage_run("alignment", params, layout, tags) as (tracker, _):
        if is_main_process():
            layout.alignment_dir.mkdir(parents=True, exist_ok=True)
        if cfg.clip_checkpoint:
            # Stage 3 scores with the user's open_clip model: nothing to train. Load it now, so that a
            # bad file fails here rather than in stage 3, and record which file it is (its hash).
            load_alignment(cfg)
            if is_main_process():
                write_metrics(layout.alignment_dir / CLIP_RECORD, clip_checkpoint_record(cfg))
            return _finish("alignment", {"trained": 0}, layout, started)
        train = SpriteDataset(layout.processed, "train")
        val = SpriteDataset(layout.processed, "val")
        images = lambda ds: torch.stack([ds[i][0] for i in range(len(ds))])  # noqa: E731
        model, history = train_alignment(cfg, images(train), train.captions, images(val), val.captions,
                                         seed=params.seed, device=resolve_device(device), tracker=tracker)
        if not is_main_process():
            return {}
        model.save(layout.alignment_model, cfg, history)
        tracker.log_artifact(layout.alignment_model, "checkpoint")
        tracker.log_image(similarity_image(model, images(val), val.captions), "val_similarity.png")
        best = min(history, key=lambda h: h.get("val_loss", float("inf")))
        keep = ("epoch", "train_loss", "val_loss", "val_top1", "val_r_precision", "val_matched_cosine")
        return _finish("alignment", {("best_epoch" if k == "epoch" else k): best[k] for k in keep if k in best},
                       layout, started)


def similarity_image(model, images, captions, cell: int = 4):
    """Validation image x caption cosine similarities as a picture: a bright diagonal = aligned."""
    import torch
    from PIL import Image

    from pokesprite.models.alignment import similarity_matrix

    sim = similarity_matrix(model, images, captions)
    lo, hi = float(sim.min()), float(sim.max())
    pixels = ((sim - lo) / max(hi - lo, 1e-8) * 255).round().to(torch.uint8).numpy()
    return Image.fromarray(pixels, mode="L").resize((cell * len(captions),) * 2, Image.NEAREST)


def load_stage_alignment(params: Params, layout: Layout, device):
    """Stage 3's scorer: the user's open_clip checkpoint (the file the alignment stage recorded),
    else the one the alignment stage trained."""
    from pokesprite.models.alignment import CLIP_RECORD, clip_checkpoint_record, load_alignment

    cfg = params.finetune.alignment
    if cfg.clip_checkpoint:
        record = layout.alignment_dir / CLIP_RECORD
        recorded = json.loads(record.read_text()) if record.is_file() else None
        if recorded != clip_checkpoint_record(cfg):
            raise ValueError(f"finetune.alignment.clip_checkpoint {cfg.clip_checkpoint!r} is not the file the "
                             f"alignment stage recorded in {record} ({'none' if recorded is None else recorded}): "
                             "run the alignment stage again (dvc repro alignment; dvc repro --force alignment "
                             "when the file changed under the same path)")
    model = load_alignment(cfg, device=device, trained=layout.alignment_model)
    if model is None:
        raise FileNotFoundError(f"{layout.alignment_model}: no alignment model; run the alignment stage first "
                                "(dvc repro alignment) or set finetune.alignment.clip_checkpoint")
    return model


def read_checkpoint(path: Path) -> dict:
    """A whole checkpoint (training state included) on the CPU."""
    from pokesprite.checkpoints import read

    return read(path)


def replay_history(tracker: Tracker, checkpoint: Path | None) -> None:
    """Log the epochs a resumed run trained before ``checkpoint`` (its stored history), so that this
    run's MLflow metrics and plots/<stage>.csv show the whole curve, not only the epochs after it."""
    if checkpoint is None:
        return
    ckpt = read_checkpoint(checkpoint)
    for entry in ckpt.get("history", []):
        tracker.log_metrics({k: v for k, v in entry.items() if k != "epoch"}, step=entry["epoch"])


# Train settings that change how a run is carried out, not what it learns: a resumed run may change them.
OPERATIONAL = ("max_minutes", "save_every", "checkpoint_every", "log_every", "sample_every", "precision",
               "channels_last", "compile")


def resume_differences(stored: dict | None, stage: str, params: Params) -> list[str]:
    """How ``params`` differ from the stage config a training checkpoint was written under (its
    ``stage_config``: the stage's own section and any whole section stored beside it, e.g. text), one
    line per key; empty when a resume would continue the same run. ``train.OPERATIONAL`` keys may differ:
    a resume can take a longer time budget or write checkpoints more often."""
    if not isinstance(stored, dict):
        return [f"the checkpoint records no {stage} config"]
    own = to_dict(getattr(params, stage))
    sections = {f.name for f in dataclasses.fields(params)}
    current = dict(own)
    for key in stored:
        if key not in own and key in sections:
            section = getattr(params, key)
            current[key] = to_dict(section) if dataclasses.is_dataclass(section) else section
    old, new = flatten(stored), flatten(current)
    lines = []
    for key in sorted(old.keys() | new.keys()):
        if key.startswith("train.") and key.removeprefix("train.") in OPERATIONAL:
            continue
        before, now = old.get(key, "(absent)"), new.get(key, "(absent)")
        if before != now:
            name = f"{stage}.{key}" if key.split(".")[0] in own else key
            lines.append(f"{name}: {before!r} in the checkpoint, {now!r} now")
    return lines


def resume_hint(stage: str, number: str, layout: Layout, *, params_file: str = "params.yaml",
                under_dvc: bool = False) -> str:
    """What to type to continue an interrupted training stage from its last.pt."""
    path = layout.stage_dir(stage) / "last.pt"
    if not path.is_file():
        return f"{stage} was interrupted before its first checkpoint; nothing to resume: run it again."
    epoch = read_checkpoint(path).get("epoch", "?")
    flags = [] if params_file == "params.yaml" else ["--config", params_file]
    if layout.root != Path("."):
        flags += ["--root", str(layout.root)]
    if layout.out != layout.root:
        flags += ["--out", str(layout.out)]
    command = " ".join(["pokesprite train", *flags, "--stage", number, "--resume", str(path)])
    hint = f"{stage} was interrupted; {path} holds epoch {epoch}. To continue from it:\n  {command}"
    if under_dvc:
        hint += f"\nthen record it and run the stages after it:\n  dvc commit -f {stage} && dvc repro"
    return hint


def run_vae(params: Params, *, root: str | Path = ".", out: str | Path | None = None,
            tags: dict | None = None, device=None, resume: Path | None = None) -> dict:
    from pokesprite.train.vae import train_vae

    layout, started = Layout(root, out), time.perf_counter()
    with stage_run("vae", params, layout, tags) as (tracker, _):
        replay_history(tracker, resume)
        metrics = train_vae(params.vae, params.data, data_dir=layout.processed, out_dir=layout.vae_dir,
                            seed=params.seed, device=resolve_device(device), tracker=tracker,
                            text_cfg=params.text, resume=resume)
        tracker.log_artifact(layout.vae_checkpoint, "checkpoint")
        return _finish("vae", metrics, layout, started)


def run_diffusion(params: Params, *, root: str | Path = ".", out: str | Path | None = None,
                  tags: dict | None = None, device=None, vae_checkpoint: Path | None = None,
                  resume: Path | None = None) -> dict:
    from pokesprite.train.diffusion import train_diffusion

    layout, started = Layout(root, out), time.perf_counter()
    with stage_run("diffusion", params, layout, tags) as (tracker, _):
        replay_history(tracker, resume)
        metrics = train_diffusion(params.diffusion, params.text, data_dir=layout.processed,
                                  vae_checkpoint=Path(vae_checkpoint or layout.vae_checkpoint),
                                  out_dir=layout.diffusion_dir, seed=params.seed, device=resolve_device(device),
                                  tracker=tracker, resume=resume)
        tracker.log_artifact(layout.diffusion_checkpoint, "checkpoint")
        return _finish("diffusion", metrics, layout, started)


def run_finetune(params: Params, *, root: str | Path = ".", out: str | Path | None = None,
                 tags: dict | None = None, device=None, vae_checkpoint: Path | None = None,
                 diffusion_checkpoint: Path | None = None, resume: Path | None = None) -> dict:
    """Fine-tune the text encoder against the stage-3 scorer; writes the combined model."""
    from pokesprite.train.finetune import train_finetune

    layout, started = Layout(root, out), time.perf_counter()
    with stage_run("finetune", params, layout, tags) as (tracker, _):
        replay_history(tracker, resume)
        dev = resolve_device(device)
        metrics = train_finetune(params.finetune, data_dir=layout.processed,
                                 vae_checkpoint=Path(vae_checkpoint or layout.vae_checkpoint),
                                 diffusion_checkpoint=Path(diffusion_checkpoint or layout.diffusion_checkpoint),
                                 alignment=load_stage_alignment(params, layout, dev),
                                 out_dir=layout.finetune_dir, seed=params.seed, device=dev,
                                 tracker=tracker, resume=resume)
        return _finish("finetune", metrics, layout, started)


def run_reference(params: Params, *, root: str | Path = ".", out: str | Path | None = None,
                  tags: dict | None = None, device=None) -> dict:
    """Inception features of every real sprite and the independent scorer (depends on the data only)."""
    from pokesprite.evaluation.reference import build_reference

    layout, started = Layout(root, out), time.perf_counter()
    with stage_run("reference", params, layout, tags):
        metrics = build_reference(layout.processed, params.evaluate, out_dir=layout.reference_dir,
                                  device=resolve_device(device))
        return _finish("reference", metrics, layout, started)


def run_evaluate(params: Params, *, root: str | Path = ".", out: str | Path | None = None,
                 tags: dict | None = None, device=None) -> dict:
    """Measure the combined model, log its pictures, register it and decide champion or challenger."""
    from pokesprite.evaluation.evaluate import evaluate
    from pokesprite.evaluation.guidance_curve import CSV_FILE, write_curve_csv
    from pokesprite.images import save_image_atomic
    from pokesprite.losses import PerceptualLoss
    from pokesprite.pipeline import SpritePipeline

    layout, started = Layout(root, out), time.perf_counter()
    dev = resolve_device(device)
    with stage_run("evaluate", params, layout, tags) as (tracker, run):
        pipeline = SpritePipeline.load(layout.model_dir, device=dev)
        before_text = SpritePipeline.from_checkpoints(layout.vae_checkpoint, layout.diffusion_checkpoint, dev).text
        result = evaluate(pipeline, before_text=before_text, alignment=load_stage_alignment(params, layout, dev),
                          processed_dir=layout.processed, reference_dir=layout.reference_dir,
                          cfg=params.evaluate,
                          perceptual=PerceptualLoss(net="vgg19", size=params.evaluate.perceptual_size).to(dev))
        metrics, facts = result.metrics, None
        layout.evaluate_dir.mkdir(parents=True, exist_ok=True)
        # sample_grid.png, memorisation.png and (with guidance_scales) guidance_curve.png, under the same
        # names in every run: compare runs side by side
        for name, image in result.images.items():
            save_image_atomic(image, layout.evaluate_dir / name)
            tracker.log_image(image, name)
        save_image_atomic(result.images["sample_grid.png"], layout.plots / "sample_grid.png")
        # Always written (a header only without evaluate.guidance_scales): a dvc.yaml plot reads it.
        write_curve_csv(result.guidance_curve or [], layout.evaluate_dir / CSV_FILE)
        if result.guidance_curve:
            tracker.log_artifact(layout.evaluate_dir / CSV_FILE)
        if run is not None:
            import mlflow

            from pokesprite.lineage import lineage_tags
            from pokesprite.registry import register_evaluated

            with store_lock(mlflow.get_tracking_uri()):  # one champion decision at a time (dvc queue -j N)
                changed = {"changed": run.data.tags["changed"]} if "changed" in run.data.tags else {}
                decision = register_evaluated(layout.model_dir, params.mlflow.registered_model, metrics,
                                              lineage_tags(layout.root, {**(tags or {}), **changed},
                                                           running="evaluate"),
                                              alignment_tolerance=params.evaluate.alignment_tolerance,
                                              background=params.data.background, protocol=result.protocol)
            log.info("registered %s version %d as %s: %s", params.mlflow.registered_model, decision["version"],
                     decision["alias"], decision["reason"])
            facts = {"registered_version": decision["version"], "promoted": int(decision["alias"] == "champion")}
        return _finish("evaluate", metrics, layout, started, facts)
