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
    outputs/<stage>/tensorboard/ TensorBoard events (`tensorboard --logdir outputs`)
    metrics/<stage>.json         final metrics of each stage (`dvc metrics show`)
    plots/<stage>.csv            per-epoch metrics of each training stage (`dvc plots show`)

``POKESPRITE_TRACKING=off`` (``pokesprite train --no-mlflow``) skips MLflow: metrics, plots and
TensorBoard are still written, nothing is registered. For machines without the project's store.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path

import torch

from pokesprite.config import Params, flatten, to_dict
from pokesprite.lineage import git_commit
from pokesprite.tracking import MlflowTracker, Tracker, configure_mlflow, ensure_experiment, tracking_enabled

log = logging.getLogger(__name__)
STAGES = ("preprocess", "reference", "alignment", "vae", "diffusion", "finetune", "evaluate")


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

    @property
    def vae_checkpoint(self) -> Path:
        return self.vae_dir / "best.pt"

    @property
    def diffusion_checkpoint(self) -> Path:
        return self.diffusion_dir / "best.pt"

    @property
    def alignment_model(self) -> Path:
        return self.alignment_dir / "model.pt"

    def tensorboard(self, stage: str) -> Path:
        return self.out / "outputs" / stage / "tensorboard"

    @property
    def model_dir(self) -> Path:
        return self.finetune_dir / "model"


def resolve_device(name: str | None = None) -> torch.device:
    """``auto`` (the default, or $POKESPRITE_DEVICE) picks CUDA when present, else the CPU.

    On CUDA, float32 matrix products may use TF32 tensor cores (``set_float32_matmul_precision("high")``).
    """
    name = name or os.environ.get("POKESPRITE_DEVICE", "auto")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    return device


def write_metrics(path: Path, metrics: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def write_plot(path: Path, history: dict[str, list[tuple[int, float]]]) -> None:
    """Per-epoch metrics as one CSV row per epoch (``dvc plots show`` draws them)."""
    epochs = sorted({step for series in history.values() for step, _ in series})
    if not epochs:
        return
    names = sorted(history)
    table = {name: dict(series) for name, series in history.items()}
    lines = [",".join(["epoch", *names])]
    lines += [",".join([str(e), *(f"{table[n][e]:.6g}" if e in table[n] else "" for n in names)]) for e in epochs]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)


@contextlib.contextmanager
def stage_run(stage: str, params: Params, sections: tuple[str, ...], layout: Layout, tags: dict | None):
    """One MLflow run for one stage (the params of the sections it uses, lineage tags); with tracking
    off, a plain TensorBoard tracker and no run. Per-epoch metrics go to plots/<stage>.csv at the end."""
    if not tracking_enabled():
        tracker = Tracker(tensorboard_dir=layout.tensorboard(stage))
        try:
            yield tracker, None
        finally:
            tracker.close()
            write_plot(layout.plots / f"{stage}.csv", tracker.history)
        return
    import mlflow

    configure_mlflow(layout.root)
    experiment_id = ensure_experiment(params.mlflow.experiment, layout.root)
    all_tags = {"stage": stage, **({"git_commit": c} if (c := git_commit(layout.root)) else {}), **(tags or {})}
    with mlflow.start_run(experiment_id=experiment_id, run_name=stage, tags=all_tags) as run:
        tracker = MlflowTracker(tensorboard_dir=layout.tensorboard(stage))
        tracker.log_params(flatten({s: getattr(params, s) if s == "seed" else to_dict(getattr(params, s))
                                    for s in sections}))
        try:
            yield tracker, run
        finally:
            tracker.close()
            write_plot(layout.plots / f"{stage}.csv", tracker.history)


def _finish(stage: str, metrics: dict, layout: Layout, started: float) -> dict:
    metrics = {**metrics, "wall_seconds": round(time.perf_counter() - started, 1)}
    if tracking_enabled():
        import mlflow

        mlflow.log_metrics({f"final_{k}": float(v) for k, v in metrics.items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool)})
    write_metrics(layout.metrics / f"{stage}.json", metrics)
    log.info("%s done in %.0f s: %s", stage, metrics["wall_seconds"], metrics)
    return metrics


def run_preprocess(params: Params, *, root: str | Path = ".", out: str | Path | None = None,
                   tags: dict | None = None, device=None) -> dict:
    """Composite, split and index the raw sprites (on the CPU: ``device`` is accepted and unused)."""
    from pokesprite.data.preprocess import preprocess, preview_grid
    from pokesprite.models.text import load_tokenizer

    layout, started = Layout(root, out), time.perf_counter()
    with stage_run("preprocess", params, ("seed", "data", "text"), layout, tags) as (tracker, _):
        stats = preprocess(params.data, raw_dir=layout.raw, out_dir=layout.processed, seed=params.seed,
                           tokenizer=load_tokenizer(params.text.model))
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
    from pokesprite.data.dataset import SpriteDataset
    from pokesprite.models.alignment import train_alignment

    layout, started = Layout(root, out), time.perf_counter()
    cfg = params.finetune.alignment
    with stage_run("alignment", params, ("seed", "data", "finetune"), layout, tags) as (tracker, _):
        layout.alignment_dir.mkdir(parents=True, exist_ok=True)
        if cfg.clip_checkpoint:
            # Stage 3 scores with the user's open_clip model; nothing to train. The file says so.
            (layout.alignment_dir / "USING_CLIP_CHECKPOINT").write_text(cfg.clip_checkpoint + "\n")
            return _finish("alignment", {"trained": 0}, layout, started)
        train = SpriteDataset(layout.processed, "train", params.data)
        val = SpriteDataset(layout.processed, "val", params.data)
        images = lambda ds: torch.stack([ds[i][0] for i in range(len(ds))])  # noqa: E731
        model, history = train_alignment(cfg, images(train), train.captions, images(val), val.captions,
                                         seed=params.seed, device=resolve_device(device),
                                         log=tracker.log_metrics)
        model.save(layout.alignment_model, cfg, history)
        tracker.log_artifact(layout.alignment_model, "checkpoint")
        tracker.log_image(similarity_image(model, images(val), val.captions), "val_similarity.png")
        best = min(history, key=lambda h: h.get("val_loss", float("inf")))
        keep = ("epoch", "train_loss", "val_loss", "val_top1", "val_r_precision", "val_matched_cosine")
        return _finish("alignment", {("best_epoch" if k == "epoch" else k): best[k] for k in keep if k in best},
                       layout, started)


def similarity_image(model, images, captions, cell: int = 4):
    """Validation image x caption cosine similarities as a picture: a bright diagonal = aligned."""
    from PIL import Image

    from pokesprite.models.alignment import similarity_matrix

    sim = similarity_matrix(model, images, captions)
    lo, hi = float(sim.min()), float(sim.max())
    pixels = ((sim - lo) / max(hi - lo, 1e-8) * 255).round().to(torch.uint8).numpy()
    return Image.fromarray(pixels, mode="L").resize((cell * len(captions),) * 2, Image.NEAREST)


def load_stage_alignment(params: Params, layout: Layout, device):
    """Stage 3's scorer: the user's open_clip checkpoint, else the one the alignment stage trained."""
    from pokesprite.models.alignment import load_alignment

    model = load_alignment(params.finetune.alignment, device=device, trained=layout.alignment_model)
    if model is None:
        raise FileNotFoundError(f"{layout.alignment_model}: no alignment model; run the alignment stage first "
                                "(dvc repro alignment) or set finetune.alignment.clip_checkpoint")
    return model


def run_vae(params: Params, *, root: str | Path = ".", out: str | Path | None = None,
            tags: dict | None = None, device=None, resume: Path | None = None) -> dict:
    from pokesprite.train.vae import train_vae

    layout, started = Layout(root, out), time.perf_counter()
    with stage_run("vae", params, ("seed", "data", "text", "vae"), layout, tags) as (tracker, _):
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
    with stage_run("diffusion", params, ("seed", "data", "text", "diffusion"), layout, tags) as (tracker, _):
        metrics = train_diffusion(params.diffusion, params.data, params.text, data_dir=layout.processed,
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
    with stage_run("finetune", params, ("seed", "data", "finetune"), layout, tags) as (tracker, _):
        dev = resolve_device(device)
        metrics = train_finetune(params.finetune, params.data, data_dir=layout.processed,
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
    with stage_run("reference", params, ("seed", "data", "evaluate"), layout, tags):
        metrics = build_reference(layout.processed, params.data, params.evaluate, out_dir=layout.reference_dir,
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
    from pokesprite.train.diffusion import load_diffusion

    layout, started = Layout(root, out), time.perf_counter()
    dev = resolve_device(device)
    with stage_run("evaluate", params, ("seed", "evaluate", "mlflow"), layout, tags) as (tracker, run):
        pipeline = SpritePipeline.load(layout.model_dir, device=dev)
        before_text = load_diffusion(layout.diffusion_checkpoint, dev)[1]
        result = evaluate(pipeline, before_text=before_text, alignment=load_stage_alignment(params, layout, dev),
                          processed_dir=layout.processed, reference_dir=layout.reference_dir,
                          data_cfg=params.data, cfg=params.evaluate,
                          perceptual=PerceptualLoss(net="auto", size=params.evaluate.perceptual_size).to(dev))
        metrics = result.metrics
        layout.evaluate_dir.mkdir(parents=True, exist_ok=True)
        # sample_grid.png, memorisation.png and (with guidance_scales) guidance_curve.png, under the same
        # names in every run: compare runs side by side
        for name, image in result.images.items():
            save_image_atomic(image, layout.evaluate_dir / name)
            tracker.log_image(image, name)
        save_image_atomic(result.images["sample_grid.png"], layout.plots / "sample_grid.png")
        if result.guidance_curve:
            write_curve_csv(result.guidance_curve, layout.evaluate_dir / CSV_FILE)
            tracker.log_artifact(layout.evaluate_dir / CSV_FILE)
        if run is not None:
            from pokesprite.lineage import lineage_tags
            from pokesprite.registry import register_evaluated

            decision = register_evaluated(layout.model_dir, params.mlflow.registered_model, metrics,
                                          lineage_tags(layout.root, tags, running="evaluate"),
                                          alignment_tolerance=params.evaluate.alignment_tolerance)
            log.info("registered %s version %d as %s: %s", params.mlflow.registered_model, decision["version"],
                     decision["alias"], decision["reason"])
            metrics = {**metrics, "registered_version": decision["version"],
                       "promoted": int(decision["alias"] == "champion")}
        return _finish("evaluate", metrics, layout, started)
