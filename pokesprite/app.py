"""``pokesprite serve``: a web page (Gradio) that draws sprites from a prompt.

The model is loaded once at start-up: a registered version by URI (``models:/pokesprite@champion``,
from the project's MLflow store, see ``tracking.configure_mlflow``) or a saved pipeline folder
(``SpritePipeline.save``). Each request draws ``count`` sprites of one prompt, keys the background
to transparency (``images.key_background``) unless RGB is asked for, and offers the PNGs (and a zip
of them) for download. Nothing on the page is fetched from outside the server: Gradio's fonts are
served locally and analytics are off.
"""
from __future__ import annotations

import os
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pokesprite.diffusion.samplers import SAMPLERS
from pokesprite.images import WHITE, key_background, parse_colour, save_image_atomic
from pokesprite.config import MAX_PROMPT_CHARS, MAX_SEED

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # no telemetry or version check; before gradio is imported

MAX_SPRITES = 8  # per request: drawing is seconds per sprite on a CPU
MAX_GUIDANCE = 20.0


class ServeError(RuntimeError):
    """The page cannot start (no such model, port taken); the message says what to fix."""


@dataclass(frozen=True)
class Request:
    prompt: str
    seed: int
    steps: int
    guidance: float
    count: int
    sampler: str
    rgb: bool


def check_request(prompt, seed, steps, guidance, count, sampler, rgb, *, max_steps: int) -> Request:
    """The page's inputs -> a ``Request``; a ``ValueError`` names the field to fix and its allowed range."""
    prompt = (prompt or "").strip()
    if not prompt:
        raise ValueError("Prompt is empty: describe the sprite to draw, e.g. \"a small green creature "
                         "with a bulb on its back\".")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ValueError(f"Prompt is {len(prompt)} characters long; at most {MAX_PROMPT_CHARS} are accepted.")

    def whole(value, name, lo, hi):
        try:
            ok = not isinstance(value, bool) and float(value).is_integer() and lo <= int(float(value)) <= hi
        except (TypeError, ValueError, OverflowError):
            ok = False
        if not ok:
            raise ValueError(f"{name} must be a whole number from {lo} to {hi}, got {value}.")
        return int(value) if isinstance(value, int) else int(float(value))

    count = whole(count, "Number of sprites", 1, MAX_SPRITES)
    seed = whole(seed, "Seed", 0, MAX_SEED - (count - 1))  # sprite i is drawn with seed + i
    steps = whole(steps, "Sampling steps", 1, max_steps)
    try:
        ok = not isinstance(guidance, bool) and 0 <= float(guidance) <= MAX_GUIDANCE
    except (TypeError, ValueError, OverflowError):
        ok = False
    if not ok:
        raise ValueError(f"Guidance scale must be between 0 and {MAX_GUIDANCE:g} (1 = no guidance), got {guidance}.")
    if sampler not in SAMPLERS:
        raise ValueError(f"Sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}.")
    return Request(prompt, seed, steps, float(guidance), count, sampler, bool(rgb))


class SpriteStudio:
    """A loaded pipeline, what it is called on the page, and the drawing of one request."""

    def __init__(self, pipeline, label: str, *, background: tuple[int, int, int] = WHITE):
        self.pipeline = pipeline
        self.label = label
        self.background = parse_colour(background)

    @property
    def max_steps(self) -> int:
        return self.pipeline.schedule.cfg.timesteps

    def draw(self, req: Request) -> list[np.ndarray]:
        """(215, 215, 4) RGBA sprites, or (215, 215, 3) RGB when ``req.rgb``."""
        images = self.pipeline([req.prompt] * req.count, seed=req.seed, num_steps=req.steps,
                               guidance_scale=req.guidance, sampler=req.sampler)
        return [img if req.rgb else key_background(img, self.background) for img in images]


def describe_model(uri: str) -> str:
    """``models:/name@alias`` or ``models:/name/N`` -> "name version N (aliases)"; anything else as given."""
    import mlflow

    if not uri.startswith("models:/"):
        return uri
    name, _, ref = uri[len("models:/"):].partition("@")
    client = mlflow.MlflowClient()
    if ref:
        version = client.get_model_version_by_alias(name, ref).version
    else:
        name, _, version = name.partition("/")
        if not version.isdigit():
            return uri
    aliases = sorted(a for a, v in client.get_registered_model(name).aliases.items() if str(v) == str(version))
    return f"{name} version {version}" + (f" (alias {', '.join(aliases)})" if aliases else "")


def registry_hint(uri: str) -> str:
    """What the store holds, for an error about ``uri``: the model's versions and aliases, or its models."""
    import mlflow

    fallback = ("Train and register a model first (make repro), or pass --model with another URI "
                "(models:/pokesprite/2) or a pipeline folder.")
    if not uri.startswith("models:/"):
        return fallback
    name = uri[len("models:/"):].partition("@")[0].partition("/")[0]
    client = mlflow.MlflowClient()
    try:
        registered = client.get_registered_model(name)
        versions = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
    except Exception:  # no such model (or no registry): name what there is
        try:
            names = sorted(m.name for m in client.search_registered_models())
        except Exception:
            return fallback
        return (f"Registered models here: {', '.join(names)}." if names else
                "Nothing is registered here yet: " + fallback[0].lower() + fallback[1:])
    aliases = ", ".join(f"@{a} = version {v}" for a, v in sorted(registered.aliases.items())) or "none"
    return (f"{name} has versions {', '.join(map(str, versions)) or 'none'}; aliases: {aliases} "
            "(pokesprite models list shows them).")


def load_studio(model: str, *, device: str | None = None, background=None) -> SpriteStudio:
    """Load ``model`` once: a saved pipeline folder, or an MLflow model URI from the project's store."""
    from pokesprite.stages import resolve_device

    try:
        device = str(resolve_device(device))
    except ValueError as e:  # it names the device and says what to use
        raise ServeError(str(e)) from None
    if Path(model).is_dir():
        from pokesprite.pipeline import SpritePipeline

        try:
            pipeline = SpritePipeline.load(Path(model), device=device)
        except FileNotFoundError as e:
            raise ServeError(f"--model {model}: {e} (expected pipeline.pt and text_encoder/ from "
                             "SpritePipeline.save, e.g. outputs/finetune/model)") from None
        return SpriteStudio(pipeline, f"pipeline folder {Path(model).resolve()}", background=background or WHITE)
    if ":/" not in model:  # not a URI (models:/, runs:/, file:/...): meant as a folder
        raise ServeError(f"--model {model}: no such folder; give a pipeline folder (e.g. outputs/finetune/model) "
                         "or a model URI (models:/pokesprite@champion)")

    import mlflow

    from pokesprite.tracking import configure_mlflow

    uri = configure_mlflow(create=False)
    try:
        loaded = mlflow.pyfunc.load_model(model, model_config={"device": device})
        label = describe_model(model)
    except Exception as e:  # MLflow raises several types for a missing model, version or alias
        raise ServeError(f"cannot load --model {model} from {uri}: {e}\n{registry_hint(model)}") from None
    schema = loaded.metadata.get_params_schema()
    logged = {p.name: p.default for p in schema.params} if schema else {}
    # .to: versions logged before the model took a model_config load where MLflow's default put them
    return SpriteStudio(loaded.unwrap_python_model().pipeline.to(device), label,
                        background=background or logged.get("background") or WHITE)


def sprite_notes(req: Request, i: int, model: str) -> dict[str, str]:
    """What drew sprite ``i`` of ``req``, for its PNG's text notes (``Image.open(path).text``)."""
    return {"prompt": req.prompt, "seed": str(req.seed + i), "model": model, "sampler": req.sampler,
            "steps": str(req.steps), "guidance": f"{req.guidance:g}", "Software": "pokesprite"}


def save_sprites(images: list[np.ndarray], req: Request, out_dir: Path, *, model: str = "") -> list[Path]:
    """Write the sprites as PNGs named by their seeds into a fresh folder under ``out_dir``, plus a zip of
    them; each PNG's text notes hold its prompt, seed, ``model`` and sampler settings."""
    from PIL import Image

    folder = Path(tempfile.mkdtemp(prefix=time.strftime("%Y%m%d-%H%M%S-"), dir=out_dir))
    paths = [folder / f"sprite_{req.seed + i}.png" for i in range(len(images))]
    for i, (img, path) in enumerate(zip(images, paths)):
        save_image_atomic(Image.fromarray(img), path, text=sprite_notes(req, i, model))
    archive = folder / f"sprites_{req.seed}.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for path in paths:
            z.write(path, path.name)
    return paths + [archive]


def build_app(studio: SpriteStudio, *, out_dir: Path):
    """The page: prompt and settings on the left, the gallery and the downloads on the right."""
    import gradio as gr

    sample = studio.pipeline.sample

    def on_draw(prompt, seed, steps, guidance, count, sampler, rgb):
        try:
            req = check_request(prompt, seed, steps, guidance, count, sampler, rgb, max_steps=studio.max_steps)
        except ValueError as e:
            return [], None, f"**Cannot draw:** {e}"
        start = time.perf_counter()
        files = save_sprites(studio.draw(req), req, out_dir, model=studio.label)
        pngs = [str(p) for p in files if p.suffix == ".png"]
        kind = "RGB" if req.rgb else "transparent (RGBA)"
        notes = "".join(f"\n\n**Note:** the prompt {note.split(' ', 2)[2]}." for note in
                        studio.pipeline.truncation_notes([req.prompt]))  # "prompt 0 is ..." -> "the prompt is ..."
        seeds = f"{req.seed}-{req.seed + req.count - 1}"
        return pngs, [str(p) for p in files], (f"Drew {len(pngs)} {kind} sprite(s) of \"{req.prompt}\" with seeds "
                                              f"{seeds}, {req.steps} {req.sampler} steps, guidance "
                                              f"{req.guidance:g} in {time.perf_counter() - start:.1f} s.{notes}")

    with gr.Blocks(title="pokesprite", analytics_enabled=False) as app:
        gr.Markdown(f"# pokesprite\nServing **{studio.label}**. Sprite i is drawn with seed + i: the same "
                    "prompt and seed give the same sprite, however many are drawn.", elem_id="model-info")
        with gr.Row():
            with gr.Column(scale=1):
                prompt = gr.Textbox(label="Prompt", lines=2, elem_id="prompt",
                                    placeholder="a small green creature with a bulb on its back")
                seed = gr.Number(label="Seed", value=0, precision=0, elem_id="seed")
                steps = gr.Number(label=f"Sampling steps (1-{studio.max_steps})", value=sample.steps, precision=0,
                                  elem_id="steps")
                guidance = gr.Number(label=f"Guidance scale (0-{MAX_GUIDANCE:g}, 1 = none)",
                                     value=sample.guidance_scale, elem_id="guidance")
                count = gr.Slider(1, MAX_SPRITES, value=4, step=1, label="Number of sprites", elem_id="count")
                sampler = gr.Dropdown(list(SAMPLERS), value=sample.sampler, label="Sampler", elem_id="sampler")
                rgb = gr.Checkbox(value=False, label="Keep the background (RGB instead of transparent)",
                                  elem_id="rgb")
                button = gr.Button("Draw", variant="primary", elem_id="draw")
            with gr.Column(scale=2):
                status = gr.Markdown(elem_id="status")
                gallery = gr.Gallery(label="Sprites", columns=4, object_fit="contain", elem_id="gallery")
                files = gr.File(label="Download (PNGs and a zip)", file_count="multiple", elem_id="downloads")
        inputs = [prompt, seed, steps, guidance, count, sampler, rgb]
        button.click(on_draw, inputs, [gallery, files, status])
        prompt.submit(on_draw, inputs, [gallery, files, status])
    return app


def serve(model: str, *, host: str = "127.0.0.1", port: int = 7860, device: str | None = None,
          background=None) -> None:
    """Load ``model`` and serve the page until interrupted."""
    import logging

    logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's own start-up probes of the page
    studio = load_studio(model, device=device, background=background)
    out_dir = Path(tempfile.mkdtemp(prefix="pokesprite-serve-"))
    app = build_app(studio, out_dir=out_dir)
    try:
        app.launch(server_name=host, server_port=port, share=False, ssr_mode=False, allowed_paths=[str(out_dir)],
                   footer_links=[], quiet=True, prevent_thread_lock=True)
    except OSError as e:
        raise ServeError(f"cannot listen on {host}:{port} ({e}); pass --port with a free port "
                         "or --host with an address of this machine") from None
    print(f"serving {studio.label} at http://{host}:{port} (sprites written under {out_dir}; Ctrl-C stops)",
          flush=True)
    try:
        app.block_thread()
    finally:
        app.close()
