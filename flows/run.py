"""Entry point of the DVC stages: ``python -m flows.run STAGE`` (a stage of pokesprite.stage_table, or ``pipeline``).

With ``POKESPRITE_NPROC=N`` (N > 1) a training stage (alignment, vae, diffusion, finetune) runs on N
processes, one per GPU: this command starts ``torchrun --standalone --nproc_per_node=N`` on itself.
Under torchrun, process 0 runs the stage as the Prefect flow (and logs to MLflow); the other
processes run the same stage function beside it and write nothing (pokesprite.train.distributed).

Without ``PREFECT_API_URL`` the command runs under ``flows.server``: a Prefect server for this stage
alone, in a session of its own, so that a Ctrl-C or a failed torchrun group does not stop it before
the flow run is reported (``make repro`` starts one server for all the stages instead).
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

from pokesprite import gc_settings, malloc_settings
from pokesprite.config import ConfigError, load_params
from pokesprite.stage_table import STAGES


def configured_api_url() -> str | None:
    """The Prefect API this process would report to: $PREFECT_API_URL or the active Prefect profile's
    (``prefect config set PREFECT_API_URL=...``); None when Prefect would start a temporary server."""
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or None


DVC_PID = "POKESPRITE_DVC_PID"  # the dvc process that started this stage, for the processes it starts


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


def processes() -> int:
    """$POKESPRITE_NPROC: how many processes a training stage runs on (default 1)."""
    value = os.environ.get("POKESPRITE_NPROC", "1").strip() or "1"
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"POKESPRITE_NPROC must be a whole number >= 1 (processes, one per GPU), got {value!r}")
    return int(value)


def relaunch_under_server(stage: str, params_file: str):
    """Replace this process by ``flows.server`` running this same command beside a Prefect server of
    its own session. Prefect's temporary server would be this process's child, in its process group:
    a Ctrl-C (or torchrun stopping a failed group) would stop it too, and the flow run could then not
    be reported Crashed (Prefect's client retried the dead server for about 4 minutes)."""
    argv = [sys.executable, "-m", "flows.server", "--", sys.executable, "-m", "flows.run", stage,
            "--params", params_file]
    sys.stdout.flush(), sys.stderr.flush()
    os.execv(sys.executable, argv)


def relaunch_under_torchrun(stage: str, params_file: str, n: int, restarts: int = 0):
    """Replace this process by ``torchrun`` running this same command on ``n`` processes; a failed
    group is started again ``restarts`` times (``prefect.retries``), resuming from its last.pt."""
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
            f"--max-restarts={restarts}", "-m", "flows.run", stage, "--params", params_file]
    logging.getLogger(__name__).info("%s on %d processes: %s", stage, n, " ".join(argv[1:]))
    sys.stdout.flush(), sys.stderr.flush()
    os.execv(sys.executable, argv)


def follow(stage: str, params_file: str) -> int:
    """A process other than 0 under torchrun: the stage's function beside process 0's flow run."""
    from pokesprite import stages
    from pokesprite.stage_table import prepare_run

    params, spec = load_params(params_file), STAGES[stage]
    kwargs = {"resume": prepare_run(stage, params, stages.Layout("."))} if spec.resumable else {}
    spec.run(params, root=".", **kwargs)
    return 0


def main(argv=None) -> int:
    gc_settings.for_commands()
    malloc_settings.for_commands()
    parser = argparse.ArgumentParser(prog="python -m flows.run", description=__doc__.replace("``", "`"),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=(*STAGES, "pipeline"), metavar="STAGE",
                        help=f"a stage ({', '.join(STAGES)}) or pipeline: all of them in order")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    from pokesprite.stages import is_main_process
    from pokesprite.train import distributed

    level = logging.INFO if is_main_process() else logging.WARNING  # one process speaks
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        params = load_params(args.params)  # fail on a bad params file before Prefect starts
        n = processes()
        from pokesprite.tracking import check_server, tracking_enabled, tracking_uri

        if tracking_enabled():
            check_server(tracking_uri())  # a tracking server that is down: now, not after minutes of retries
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    parallel = args.stage in STAGES and STAGES[args.stage].parallel
    if distributed.launched() and not parallel:
        print(f"error: {args.stage} runs in one process; run it without torchrun (and POKESPRITE_NPROC)",
              file=sys.stderr)
        return 2
    torchrun = n > 1 and parallel and not distributed.launched()
    if torchrun and STAGES[args.stage].resumable and (batch := getattr(params, args.stage).train.batch_size) % n:
        print(f"error: {args.stage}.train.batch_size must be a multiple of POKESPRITE_NPROC ({n}), got {batch}: "
              "every process takes an equal share of each batch", file=sys.stderr)
        return 2
    under_dvc = "DVC_STAGE" in os.environ or "DVC_ROOT" in os.environ
    if under_dvc and DVC_PID not in os.environ:  # found once, before the processes in between multiply
        os.environ[DVC_PID] = str(dvc_ancestor() or 0)
    if not distributed.launched() and not configured_api_url():
        relaunch_under_server(args.stage, args.params)
    if torchrun:
        relaunch_under_torchrun(args.stage, args.params, n, restarts=params.prefect.retries)

    dvc = int(os.environ.get(DVC_PID, "0")) if under_dvc else 0
    if dvc:
        stop_with(dvc)
    if not is_main_process():
        return follow(args.stage, args.params)

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
