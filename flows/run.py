"""Entry point of the DVC stages: ``python -m flows.run STAGE`` (a stage of pokesprite.stage_table, or ``pipeline``)."""
from __future__ import annotations

import argparse
import logging
import sys

from pokesprite.config import ConfigError, load_params
from pokesprite.stage_table import STAGES


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.run", description=__doc__)
    parser.add_argument("stage", choices=(*STAGES, "pipeline"))
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        load_params(args.params)  # fail on a bad params file before Prefect starts
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from flows.pipeline import is_permanent, run_flow

    try:
        run_flow(args.stage, params_file=args.params)
    except KeyboardInterrupt as e:  # a training stage's note says how to resume it
        print("\n".join(["interrupted", *getattr(e, "__notes__", [])]), file=sys.stderr)
        return 130
    except Exception as e:
        if not is_permanent(e):
            raise
        print(f"error: {args.stage}: {e}", file=sys.stderr)  # a retry would not help; nothing was retried
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
