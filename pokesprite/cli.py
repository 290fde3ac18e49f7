"""The ``pokesprite`` command line.

    pokesprite data import [SOURCE]     validate and copy the raw dataset into data/
    pokesprite data stats               counts, image sizes, caption lengths, split sizes
    pokesprite generate PROMPT ...      draw sprites with a registered model
"""
from __future__ import annotations

import argparse
import json
import logging
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
    records = scan(Path(args.data))
    captions = [clean_caption(r.caption) for r in records]
    splits = split_numbers([r.number for r in records], params.data.split, params.seed)
    stats = dataset_stats(records, captions, splits, load_tokenizer(params.text.model))
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


def cmd_generate(args) -> int:
    import mlflow

    from pokesprite.tracking import configure_mlflow
    from pokesprite.images import save_image_atomic
    from PIL import Image

    configure_mlflow()
    try:
        model = mlflow.pyfunc.load_model(args.model)
    except Exception as e:  # MLflow raises several types for a missing model or alias
        print(f"error: cannot load {args.model} from {mlflow.get_tracking_uri()}: {e}\n"
              "Train and register a model first (make repro), or pass --model URI.", file=sys.stderr)
        return 1
    params = {"seed": args.seed, "num_steps": args.steps, "guidance_scale": args.guidance, "sampler": args.sampler}
    images = model.predict([args.prompt] * args.n, params={k: v for k, v in params.items() if v is not None})
    out = Path(args.out)
    for i, img in enumerate(images):
        path = out / f"sprite_{args.seed}_{i:02d}.png"
        save_image_atomic(Image.fromarray(img), path)
        print(path)
    return 0


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

    gen = sub.add_parser("generate", help="draw sprites from a text prompt with a registered model")
    gen.add_argument("prompt", help='what to draw, e.g. "a small green creature with a bulb on its back"')
    gen.add_argument("-n", type=int, default=4, help="number of sprites (default: 4)")
    gen.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same sprites")
    gen.add_argument("--steps", type=int, help="sampling steps (default: the model's own)")
    gen.add_argument("--guidance", type=float, help="classifier-free guidance scale, 1 = none (default: the model's own)")
    gen.add_argument("--sampler", choices=("ddpm", "ddim"), help="sampler (default: the model's own)")
    gen.add_argument("-o", "--out", default="out", help="output folder (default: out/)")
    gen.add_argument("--model", default="models:/pokesprite@champion",
                     help="MLflow model URI (default: models:/pokesprite@champion)")
    gen.set_defaults(func=cmd_generate)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if getattr(args, "n", 1) < 1:
        print("error: -n must be at least 1", file=sys.stderr)
        return 2
    from pokesprite.config import ConfigError
    from pokesprite.data.raw import DatasetError

    try:
        return args.func(args)
    except (ConfigError, DatasetError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
