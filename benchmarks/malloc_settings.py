"""What pokesprite.malloc_settings saves: training steps of the VAE and the U-Net (params file sizes,
``training_steps``) in processes with glibc's default malloc settings and with
``malloc_settings.for_commands()``, alternately.

    python benchmarks/malloc_settings.py              # 3 processes each, 6 timed steps a model
    python benchmarks/malloc_settings.py --reps 5 --steps 8 --json malloc.json

Each process builds both models, runs two untimed steps of each, then ``--steps`` timed ones, and
reports per step: the median wall seconds, the system CPU seconds and the page faults (from
``getrusage``); and the process's peak resident memory. The table gives the medians over processes.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODES = ("default", "commands")
sys.path.insert(0, str(REPO))  # benchmarks.peer; torch is imported only after the settings are made


def training_steps(p) -> dict[str, tuple]:
    """The VAE and the U-Net at the params file's sizes with ``benchmarks/peer.py``'s training losses
    on fixed random inputs (the U-Net's without an attention mask): name -> (Contender, train config)."""
    import torch

    from benchmarks.peer import our_unet, our_vae, unet_batch, vae_images

    cpu = torch.device("cpu")
    return {"vae": (our_vae(p, cpu, vae_images(p, cpu)), p.vae.train),
            "unet": (our_unet(p, cpu, unet_batch(p, cpu, masked=False)), p.diffusion.train)}


def child(mode: str, params: str, steps: int, threads: int) -> None:
    import resource

    if mode == "commands":
        from pokesprite import malloc_settings

        assert malloc_settings.for_commands(), "malloc_settings.for_commands() did not take (not glibc?)"
    import torch

    from benchmarks.peer import step_fn
    from pokesprite.config import load_params

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    report = {}
    for name, (contender, train) in training_steps(load_params(params)).items():
        step = step_fn(contender, train.lr, train.weight_decay)
        step(), step()
        before, times = resource.getrusage(resource.RUSAGE_SELF), []
        for _ in range(steps):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_SELF)
        report[name] = {"step_s": statistics.median(times), "sys_s": (after.ru_stime - before.ru_stime) / steps,
                        "faults": (after.ru_minflt - before.ru_minflt) / steps}
    report["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(report), flush=True)


def measure(mode: str, args) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", mode, "--params", args.params,
                          "--steps", str(args.steps), "--threads", str(args.threads)],
                         cwd=REPO, capture_output=True, text=True, timeout=1800)
    if out.returncode:
        raise SystemExit(f"the {mode} process failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml", help="params file whose model and batch sizes are used")
    parser.add_argument("--reps", type=int, default=3, help="processes per setting (default 3)")
    parser.add_argument("--steps", type=int, default=6, help="timed training steps of each model a process")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--json", type=Path, help="also write the measurements here")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.params, args.steps, args.threads)
        return 0
    runs = {mode: [] for mode in MODES}
    for rep in range(args.reps):
        for mode in MODES:
            runs[mode].append(measure(mode, args))
            print(f"{rep + 1}/{args.reps} {mode:8s} vae {runs[mode][-1]['vae']['step_s']:.3f} s/step",
                  file=sys.stderr, flush=True)
    print(f"medians of {args.reps} processes a setting, {args.steps} timed steps a model, {args.threads} threads")
    print("| settings | model | s/step | system s/step | page faults/step | peak MiB |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for mode in MODES:
        for model in ("vae", "unet"):
            med = {k: statistics.median(r[model][k] for r in runs[mode]) for k in ("step_s", "sys_s", "faults")}
            peak = statistics.median(r["peak_mib"] for r in runs[mode])
            print(f"| {mode} | {model} | {med['step_s']:.3f} | {med['sys_s']:.3f} | {med['faults']:,.0f} "
                  f"| {peak:,.0f} |")
    if args.json:
        args.json.write_text(json.dumps(runs, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
