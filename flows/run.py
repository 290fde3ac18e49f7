"""Entry point of the DVC stages: ``python -m flows.run STAGE`` (a stage of pokesprite.stage_table, or ``pipeline``)."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

from pokesprite.config import ConfigError, load_params
from pokesprite.stage_table import STAGES


def dvc_ancestor(pid: int | None = None) -> int | None:
    """The nearest ancestor process whose command line runs dvc (Linux /proc), or None."""
    pid = os.getppid() if pid is None else pid
    for _ in range(8):
        if pid <= 1:
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return None
        if any(Path(part.decode(errors="replace")).name in ("dvc", "dvc.exe") or part == b"dvc"
               for part in cmdline[:3]) or b"dvc.cli" in b" ".join(cmdline[:3]):
            return pid
        pid = int(stat.rsplit(")", 1)[1].split()[1])  # the parent: field 4 of /proc/PID/stat
    return None


def stop_with(pid: int, poll_s: float = 1.0) -> threading.Thread:
    """Interrupt this process (as Ctrl-C would: the stage saves what it has and says how to resume)
    when process ``pid`` ends: a stage must not run on as an orphan beside the next ``dvc repro``."""
    from pokesprite.tracking import pid_alive

    def watch():
        while pid_alive(pid):
            time.sleep(poll_s)
        logging.getLogger(__name__).warning("the dvc process %d that started this stage has ended; stopping", pid)
        os.kill(os.getpid(), signal.SIGINT)  # a real signal: it also wakes a blocked call

    thread = threading.Thread(target=watch, name="stop-with-dvc", daemon=True)
    thread.start()
    return thread


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

    dvc = dvc_ancestor() if "DVC_STAGE" in os.environ or "DVC_ROOT" in os.environ else None
    if dvc is not None:
        stop_with(dvc)

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
