"""Run a command with one Prefect server for all of it: ``python -m flows.server -- dvc repro``.

Without ``PREFECT_API_URL`` every stage (``python -m flows.run``) runs under this command with a
Prefect server of its own (about 8 s to start on 2 CPU cores, seven times per ``dvc repro``).
``make repro`` runs ``dvc repro`` under this command instead: one ``prefect server start`` (API, UI and its services) on a
free port of 127.0.0.1 for the whole run, so every stage reports to it, and its UI shows the flow
runs live while they run. The flow runs are kept where the temporary servers keep them
(``$PREFECT_HOME``, by default ``~/.prefect``), so ``make ui`` shows them afterwards either way.

With ``PREFECT_API_URL`` already set (a team's server, or ``make ui``'s) the command runs unchanged.
Exits with the command's exit status.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from flows.run import configured_api_url


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, server: subprocess.Popen, log: Path | None = None, timeout: float = 180.0) -> None:
    """Return once ``url`` answers 200; raise, with the server's log if given, when the server exits or
    ``timeout`` passes."""
    name = Path(str(server.args[0])).name

    def tail() -> str:
        return ":\n" + log.read_text(errors="replace")[-3000:] if log else ""

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the {name} server exited with status {server.returncode}{tail()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    hint = " (raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS on a slow machine)" if name == "prefect" else ""
    raise RuntimeError(f"the {name} server did not answer {url} within {timeout:.0f} s{hint}{tail()}")


def stop(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


@contextlib.contextmanager
def prefect_server(log: Path, env: dict | None = None, timeout: float = 180.0):
    """``prefect server start`` (API, UI and the services that store task runs and events) on a free
    port of 127.0.0.1, writing to ``log``, with ``env`` (default: this process's); yields its API URL,
    stops it at the end."""
    prefect = Path(sys.executable).with_name("prefect")
    port = free_port()
    with log.open("wb") as out:
        # Not --no-services: that also stops the services that store task runs and events, and the
        # UI would show each stage's flow run without its task run (state, retries)
        server = subprocess.Popen([str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                  stdout=out, stderr=subprocess.STDOUT, env=env,
                                  start_new_session=True)  # Ctrl-C reaches the command, which ends first
    try:
        wait_until_up(f"http://127.0.0.1:{port}/api/health", server, log, timeout)
        yield f"http://127.0.0.1:{port}/api"
    finally:
        stop(server)


def exit_status(returncode: int) -> int:
    """A child's status as a shell reports it: 128 + N for a child ended by signal N."""
    return 128 - returncode if returncode < 0 else returncode


def run_with_server(command: list[str]) -> int:
    if configured_api_url():
        return exit_status(subprocess.call(command))
    timeout = float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180"))
    with tempfile.TemporaryDirectory(prefix="pokesprite-prefect-") as tmp, \
            prefect_server(Path(tmp) / "server.log", timeout=timeout) as api_url:
        print(f"Prefect server for this run: {api_url.removesuffix('/api')} (flow runs live; stopped at the end)",
              flush=True)
        child = subprocess.Popen(command, env={**os.environ, "PREFECT_API_URL": api_url})
        # SIGTERM (kill, timeout, a cancelled CI job) goes to the command, which reports its flow run and
        # ends; the server is stopped after it. It is in a session of its own, out of reach of the signal.
        signal.signal(signal.SIGTERM, lambda signum, frame: child.send_signal(signal.SIGTERM))
        while True:  # Ctrl-C reaches the command too: it saves its work and stops, however often it is pressed
            try:
                return exit_status(child.wait())
            except KeyboardInterrupt:
                continue


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.server", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command to run, after --")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run, e.g. python -m flows.server -- dvc repro")
    try:
        return run_with_server(command)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # while the server was starting: it is stopped, the command never ran
        return 130


if __name__ == "__main__":
    sys.exit(main())
