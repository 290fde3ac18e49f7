"""Run ``pokesprite train --stage S`` for each S given, in this one process (under torchrun too).

    python tests/train_stages.py [--resume PATH] 1 2 3

The distributed test starts this once per configuration instead of once per stage (each start pays
for importing torch and transformers). Extra ``pokesprite train`` flags: --no-mlflow is always set.
"""
import argparse
import sys

from pokesprite.cli import main

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("stages", nargs="+")
parser.add_argument("--resume", help="resume the first stage from this checkpoint")
args = parser.parse_args()
for i, stage in enumerate(args.stages):
    flags = ["--resume", args.resume] if args.resume and i == 0 else []
    code = main(["train", "--stage", stage, "--no-mlflow", *flags])
    if code:
        sys.exit(code)
