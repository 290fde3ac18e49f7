"""Entry point of the DVC stages: ``python -m flows.run STAGE`` (or ``pipeline``)."""
from __future__ import annotations

import argparse
import logging
import sys

from pokesprite import stages
from pokesprite.config import ConfigError, load_params


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.run", description=__doc__)
    parser.add_argument("stage", choices=(*stages.STAGES, "pipeline"))
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        load_params(args.params)  # fail on a bad params file before Prefect starts
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from flows.pipeline import FLOWS

    FLOWS[args.stage](params_file=args.params)
    return 0


if __name__ == "__main__":
    sys.exit(main())
