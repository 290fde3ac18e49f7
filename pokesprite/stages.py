"""The four pipeline stages as the DVC stages, Prefect tasks and CLI all run them.

Each ``run_*`` function fixes the project layout (where a stage reads and writes), opens one MLflow
run, calls the stage's pure trainer and writes the stage's metrics file for DVC:

    data/                        raw dataset (DVC-tracked by data.dvc)
    outputs/preprocess/          composited sprites, index.csv, stats.json
    outputs/alignment/model.pt   the CLIP-style image-text scorer stage 3 optimises against
    outputs/vae/best.pt          VAE checkpoint (+ latent scale); last.pt, epoch_NNNN.pt to resume
    outputs/diffusion/best.pt    U-Net + text projection checkpoint (EMA weights); last.pt, epoch_NNNN.pt
    outputs/finetune/model/      the combined model (pipeline.pt + text_encoder/)
    outputs/<stage>/tensorboard/ TensorBoard events (`tensorboard --logdir outputs`)
    metrics/<stage>.json         final metrics of each stage
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import time
from pathlib import Path

import torch

from pokesprite.config import Params, flatten, to_dict
from pokesprite.tracking import MlflowTracker, configure_mlflow, ensure_experiment

log = logging.getLogger(__name__)
STAGES = ("preprocess", "vae", "diffusion", "alignment", "finetune")


class Layout:
    """Where each stage reads and writes, relative to the project root."""

    def __init__(self, root: str | Path = "."):
        self.root = Path(root)
        self.raw = self.root / "data"
        self.processed = self.root / "outputs" / "preprocess"
        self.alignment_dir = self.root / "outputs" / "alignment"
        self.vae_dir = self.root / "outputs" / "vae"
        self.diffusion_dir = self.root / "outputs" / "diffusion"
        self.finetune_dir = self.root / "outputs" / "finetune"
        self.metrics = self.root / "metrics"

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
        return self.root / "outputs" / stage / "tensorboard"

    @property
    def model_dir(self) -> Path:
        return self.finetune_dir / "model"


def resolve_device(name: str | None = None) -> torch.device:
    """``auto`` (the default, or $POKESPRITE_DEVICE) picks CUDA when present, else the CPU."""
    name = name or os.environ.get("POKESPRITE_DEVICE", "auto")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def git_commit(root: Path) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def write_metrics(path: Path, metrics: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


@contextlib.contextmanager
def stage_run(stage: str, params: Params, sections: tuple[str, ...], layout: Layout, tags: dict | None):
    """One MLflow run for one stage: the params of the sections it uses and lineage tags."""
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


def _finish(stage: str, metrics: dict, layout: Layout, started: float) -> dict:
    import mlflow

    metrics = {**metrics, "wall_seconds": round(time.perf_counter() - started, 1)}
    mlflow.log_metrics({f"final_{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float))})
    write_metrics(layout.metrics / f"{stage}.json", metrics)
    log.info("%s done in %.0f s: %s", stage, metrics["wall_seconds"], metrics)
    return metrics


def run_preprocess(params: Params, *, root: str | Path = ".", tags: dict | None = None) -> dict:
    from pokesprite.data.preprocess import preprocess, preview_grid
    from pokesprite.models.text import load_tokenizer

    layout, started = Layout(root), time.perf_counter()
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


def run_alignment(params: Params, *, root: str | Path = ".", tags: dict | None = None, device=None) -> dict:
    """Train the CLIP-style scorer of stage 3 on the training split (skipped with a user CLIP checkpoint)."""
    from pokesprite.data.dataset import SpriteDataset
    from pokesprite.models.alignment import train_alignment

    layout, started = Layout(root), time.perf_counter()
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


def run_vae(params: Params, *, root: str | Path = ".", tags: dict | None = None, device=None,
            resume: Path | None = None) -> dict:
    from pokesprite.train.vae import train_vae

    layout, started = Layout(root), time.perf_counter()
    with stage_run("vae", params, ("seed", "data", "text", "vae"), layout, tags) as (tracker, _):
        metrics = train_vae(params.vae, params.data, data_dir=layout.processed, out_dir=layout.vae_dir,
                            seed=params.seed, device=resolve_device(device), tracker=tracker,
                            text_cfg=params.text, resume=resume)
        tracker.log_artifact(layout.vae_checkpoint, "checkpoint")
        return _finish("vae", metrics, layout, started)


def run_diffusion(params: Params, *, root: str | Path = ".", tags: dict | None = None, device=None,
                  vae_checkpoint: Path | None = None, resume: Path | None = None) -> dict:
    from pokesprite.train.diffusion import train_diffusion

    layout, started = Layout(root), time.perf_counter()
    with stage_run("diffusion", params, ("seed", "data", "text", "diffusion"), layout, tags) as (tracker, _):
        metrics = train_diffusion(params.diffusion, params.data, params.text, data_dir=layout.processed,
                                  vae_checkpoint=Path(vae_checkpoint or layout.vae_checkpoint),
                                  out_dir=layout.diffusion_dir, seed=params.seed, device=resolve_device(device),
                                  tracker=tracker, resume=resume)
        tracker.log_artifact(layout.diffusion_checkpoint, "checkpoint")
        return _finish("diffusion", metrics, layout, started)


def run_finetune(params: Params, *, root: str | Path = ".", tags: dict | None = None, device=None,
                 vae_checkpoint: Path | None = None, diffusion_checkpoint: Path | None = None,
                 resume: Path | None = None) -> dict:
    """Fine-tune the text encoder, log the combined model, register it and name a champion if none."""
    from pokesprite.registry import log_model, set_champion_if_none
    from pokesprite.train.finetune import train_finetune

    layout, started = Layout(root), time.perf_counter()
    with stage_run("finetune", params, ("seed", "data", "finetune", "mlflow"), layout, tags) as (tracker, _):
        dev = resolve_device(device)
        metrics = train_finetune(params.finetune, params.data, data_dir=layout.processed,
                                 vae_checkpoint=Path(vae_checkpoint or layout.vae_checkpoint),
                                 diffusion_checkpoint=Path(diffusion_checkpoint or layout.diffusion_checkpoint),
                                 alignment=load_stage_alignment(params, layout, dev),
                                 out_dir=layout.finetune_dir, seed=params.seed, device=dev,
                                 tracker=tracker, resume=resume)
        name = params.mlflow.registered_model
        info = log_model(layout.model_dir, registered_model_name=name)
        version = info.registered_model_version
        promoted = set_champion_if_none(name, version)
        log.info("registered %s version %s%s", name, version, " as champion" if promoted else "")
        return _finish("finetune", {**metrics, "registered_version": int(version)}, layout, started)
