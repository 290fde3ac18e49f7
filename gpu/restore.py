"""Unpack gpu/bundle/ on the GPU machine: WORK/site (the vendored packages with their weights back
in place, fp32) and WORK/data (the raw dataset as PNGs); every file and restored tensor is checked
against the checksums pack.py recorded.

    python gpu/restore.py BUNDLE WORK [--sprites N] [--config F]

--sprites N keeps the first N sprites with their caption lines and table rows (a quick rehearsal).
Needs torch, safetensors and Pillow (and pokesprite with transformers for --config).
"""
from __future__ import annotations

import argparse
import importlib
import io
import json
import multiprocessing
import os
import sys
import tarfile
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from codec import canonical_rgba, dequantize, file_sha256, load_xz, pixels_sha256, tensors_sha256  # noqa: E402

CAPTIONS, TABLE = "text_description_concat.csv", "pokemon.csv"


def checked(state: dict, name: str, manifest: dict) -> dict:
    if tensors_sha256(state) != manifest["restored"][name]["sha256"]:
        raise SystemExit(f"{name}: the restored weights differ from the ones packed")
    return state


def restore_weights(bundle: Path, site: Path, manifest: dict) -> set[int]:
    """Writes the three weight files; returns the wordpieces whose MiniLM embedding was kept."""
    from safetensors.torch import save_file

    entry = manifest["restored"]
    packed = load_xz(bundle / "minilm.xz")
    kept = set(packed["embeddings.word_embeddings.weight"]["rows"].tolist())
    state = checked(dequantize(packed), "minilm", manifest)
    save_file(state, str(site / entry["minilm"]["path"]), metadata={"format": "pt"})

    packed = load_xz(bundle / "inception.xz")
    module = torch.jit.load(io.BytesIO(packed["skeleton"]), map_location="cpu")
    module.load_state_dict(checked(dequantize(packed["weights"]), "inception", manifest))
    torch.jit.save(module, str(site / entry["inception"]["path"]))

    state = checked(dequantize(load_xz(bundle / "vgg19.xz")), "vgg19", manifest)
    torch.save(state, site / entry["vgg19"]["path"])
    return kept


def check_vocabulary(config: str, data: Path, kept: set[int]) -> None:
    """Every wordpiece of the captions and of the config's grid prompts must have its embedding."""
    importlib.invalidate_caches()  # WORK/site did not exist when Python started
    from pokesprite.config import load_params
    from pokesprite.data.preprocess import clean_caption
    from pokesprite.models.text import load_tokenizer

    captions = (data / CAPTIONS).read_text(encoding="utf-8").splitlines()
    texts = [clean_caption(t) for t in captions + list(load_params(config).evaluate.grid_prompts)]
    missing = {i for ids in load_tokenizer("bundled")(texts)["input_ids"] for i in ids} - kept
    if missing:
        raise SystemExit(f"{len(missing)} wordpieces of {config}'s prompts or the captions are not in the "
                         f"bundle's text encoder: rebuild it with gpu/pack.py --configs {config} ...")


def decode_sprite(job: tuple[bytes, str]) -> str:
    """WebP bytes -> PNG at the given path; returns the canonical pixels' sha256."""
    webp, png = job
    canon = canonical_rgba(Image.open(io.BytesIO(webp)))
    Image.fromarray(canon).save(png, compress_level=1)
    return pixels_sha256(canon)


def restore_data(bundle: Path, data: Path, digests: dict[str, str], sprites: int | None) -> int:
    jobs = []
    with tarfile.open(bundle / "data.tar.xz") as tar:
        for member in tar.getmembers():
            if not member.isfile():
                continue
            path = data / member.name
            path.parent.mkdir(parents=True, exist_ok=True)
            content = tar.extractfile(member).read()
            if member.name.endswith(".webp"):
                jobs.append((content, str(path.with_suffix(".png"))))
            else:
                path.write_bytes(content)
    jobs.sort(key=lambda j: j[1])
    if sprites:  # the first N sprites, caption lines and table rows (as the tests' subset)
        jobs = jobs[:sprites]
        lines = (data / CAPTIONS).read_text(encoding="utf-8").splitlines()[:sprites]
        (data / CAPTIONS).write_text("\n".join(lines) + "\n", encoding="utf-8")
        rows = (data / TABLE).read_bytes().decode("utf-16").split("\r\n")
        (data / TABLE).write_bytes("\r\n".join(rows[:sprites + 1] + [""]).encode("utf-16"))
    with multiprocessing.Pool(min(16, os.cpu_count() or 1)) as pool:
        got = pool.map(decode_sprite, jobs, chunksize=8)
    bad = [png for (_, png), d in zip(jobs, got) if d != digests[Path(png).stem]]
    if bad:
        raise SystemExit(f"{len(bad)} sprites differ from the packed ones, e.g. {bad[0]}")
    return len(jobs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", type=Path)
    ap.add_argument("work", type=Path)
    ap.add_argument("--sprites", type=int, default=0, help="keep only the first N sprites (0: all)")
    ap.add_argument("--config", help="check that the text encoder knows every wordpiece of this profile's "
                                     "prompts and of the captions (needs pokesprite and WORK/site importable)")
    args = ap.parse_args(argv)
    started = time.perf_counter()
    manifest = json.loads((args.bundle / "manifest.json").read_text())
    for name, f in manifest["files"].items():
        if file_sha256(args.bundle / name) != f["sha256"]:
            raise SystemExit(f"{args.bundle / name}: checksum differs from manifest.json (incomplete copy?)")
    site, data = args.work / "site", args.work / "data"
    with tarfile.open(args.bundle / "packages.tar.xz") as tar:
        tar.extractall(site, filter="data")
    kept = restore_weights(args.bundle, site, manifest)
    n = restore_data(args.bundle, data, manifest["restored"]["data"]["pixels_sha256"], args.sprites or None)
    if args.config:
        check_vocabulary(args.config, data, kept)
    print(f"restored {site} (weights checked) and {n} sprites in {data} (pixels checked) "
          f"in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
