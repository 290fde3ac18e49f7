"""How the evaluation draws sprites: the pipeline with the evaluation's sampler settings, sprite i seeded with
``cfg.seed + i`` (the pipeline's own rule, so an evaluation sprite can be redrawn with ``pokesprite generate``)."""
from __future__ import annotations

import numpy as np
import torch

from pokesprite.config import EvaluateConfig
from pokesprite.progress import progress


def sample(pipeline, prompts: list[str], seed: int, cfg: EvaluateConfig, *,
           guidance_scale: float | None = None) -> np.ndarray:
    """The pipeline's sprites with the evaluation's sampler settings (empty / 0 / None = the model's own)."""
    return pipeline(prompts, seed=seed, num_steps=cfg.steps or None, sampler=cfg.sampler or None,
                    guidance_scale=guidance_scale, precision=cfg.precision, batch=len(prompts))


def draw(pipeline, prompts: list[str], cfg: EvaluateConfig, desc: str, *,
         guidance_scale: float | None = None) -> torch.Tensor:
    """One sprite per prompt, sprite i drawn with seed ``cfg.seed + i``: uint8 (N, 3, H, W)."""
    out = []
    starts = range(0, len(prompts), cfg.batch_size)
    for i in progress(starts, desc=desc, leave=False):
        batch = sample(pipeline, prompts[i:i + cfg.batch_size], cfg.seed + i, cfg, guidance_scale=guidance_scale)
        out.append(torch.from_numpy(batch))
    return torch.cat(out).permute(0, 3, 1, 2).contiguous()
