"""Experiments and metrics as a person reads them: ``pokesprite exp show`` and ``pokesprite metrics show``.

``dvc exp show`` prints every param and metric (over 200 columns here) and ``dvc metrics show``
every metric of every stage. These two commands read DVC's own JSON (``dvc exp show --json``,
``dvc metrics diff --all --json``, ``dvc params diff --json``) and print, within 120 columns, the
headline evaluation metrics and only the params that differ:

    pokesprite exp show        one row per experiment: its metrics and what it changed
    pokesprite metrics show    the metrics of the workspace against HEAD, and the params changed since

Plain DVC comes close with (``--keep`` protects the headline metrics from ``--only-changed`` and
``--drop``; the drop pattern removes the creation time, dependency hashes and file-prefixed metrics
(``.*/``) and the other, dot-free metric names (``[a-z_]+$``), leaving the params that changed)::

    dvc exp show --only-changed --drop 'Created|.*/|[a-z_]+$' \\
        --keep 'Experiment$|kid$|fid$|recon_psnr$|independent_r_precision$|text_sensitivity$'
    dvc metrics diff --targets metrics/evaluate.json    # the evaluation, workspace against HEAD

but it prints one column per changed param, with full names, as wide as they make it.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

from pokesprite.config import flatten

METRICS_FILE = "metrics/evaluate.json"
PARAMS_FILE = "params.yaml"
WIDTH = 120


@dataclass(frozen=True)
class Headline:
    label: str  # the column header
    key: str  # the key in metrics/evaluate.json
    better: str  # "lower" or "higher"
    note: str = ""


HEADLINE = (
    Headline("kid", "kid", "lower"),
    Headline("fid", "fid", "lower"),
    Headline("psnr", "recon_psnr", "higher", "dB"),
    Headline("R-prec", "independent_r_precision", "higher", "chance 1/32"),
    Headline("text-sens", "text_sensitivity", "higher"),
)


def headlines(keys: str | None) -> tuple[Headline, ...]:
    """``--metrics kid,fid,...``: the known headline metrics by label or key; other keys as they are."""
    if not keys:
        return HEADLINE
    known = {h.label: h for h in HEADLINE} | {h.key: h for h in HEADLINE}
    return tuple(known.get(k, Headline(k, k, "")) for k in (k.strip() for k in keys.split(",")) if k)


def legend(metrics: tuple[Headline, ...]) -> str:
    lower = [h.label for h in metrics if h.better == "lower"]
    higher = [h.label for h in metrics if h.better == "higher"]
    renamed = [f"{h.label} = {h.key}" + (f" ({h.note})" if h.note else "") for h in metrics if h.label != h.key]
    parts = [f"{', '.join(lower)}: lower is better" if lower else "",
             f"{', '.join(higher)}: higher is better" if higher else "", "; ".join(renamed)]
    return "; ".join(p for p in parts if p)


def wrap_notes(notes: list[str], width: int) -> list[str]:
    return [line for note in notes if note for line in textwrap.wrap(note, width, break_on_hyphens=False)]


class DvcCommandError(RuntimeError):
    pass


def run_dvc(args: list[str], root: Path | str = ".") -> object:
    """Run ``dvc ARGS --json`` (the DVC of this Python) in ``root`` and return its parsed output."""
    cmd = [sys.executable, "-m", "dvc", *args, "--json"]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    if proc.returncode:
        msg = proc.stderr.strip() or proc.stdout.strip() or f"exit status {proc.returncode}"
        raise DvcCommandError(f"`dvc {' '.join(args)}` failed in {Path(root).resolve()}: {msg}\n"
                              "Run this in the pokesprite project folder (the one holding dvc.yaml).")
    return json.loads(proc.stdout or "null")


# ---- formatting helpers ----------------------------------------------------------------------

def fmt_value(value) -> str:
    """A param or metric value, short: 0.001, [8,16], true, null."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(fmt_value(v) for v in value) + "]"
    return "null" if value is None else str(value)


def clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[:max(width - 1, 0)] + "~"


def table(head: list[str], rows: list[list[str]], *, width: int = WIDTH, min_last: int = 30) -> str:
    """Left-aligned columns two spaces apart under a dashed rule. The last column takes what is left of
    ``width`` and wraps onto continuation lines; when less than ``min_last`` is left, it goes on
    indented lines under its row instead."""
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head) - 1)]
    indent = sum(widths) + 2 * len(widths)
    below = width - indent < min_last
    if below:
        indent = 4
    last = max(width - indent, 10)

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

    def wrapped(text: str) -> list[str]:
        return textwrap.wrap(text, last, break_on_hyphens=False) or [""]  # long words are split

    lines = []
    for row in [head, None, *rows]:
        if row is None:
            rule = [*widths] if below else [*widths, min(last, max(len(r[-1]) for r in [head, *rows]))]
            lines.append("  ".join("-" * w for w in rule if w))
            continue
        chunks = wrapped(row[-1])
        if below:
            lines.append(line(row[:-1]))
            lines += [(" " * indent + c).rstrip() for c in chunks if c]
        else:
            lines.append((line(row[:-1]).ljust(indent) + chunks[0]).rstrip())
            lines += [(" " * indent + c).rstrip() for c in chunks[1:]]
    return "\n".join(lines)


# ---- dvc exp show --json -> rows -------------------------------------------------------------

@dataclass
class ExpRow:
    name: str
    kind: str  # "workspace", "baseline" or "experiment"
    params: dict = field(default_factory=dict)  # flattened: "train.lr" (params.yaml), "file:key" otherwise
    metrics: dict = field(default_factory=dict)  # flattened: "metrics/evaluate.json:kid"
    state: str = "success"  # or queued, running, failed
    baseline: int | None = None  # index of this row's baseline row


def _files(section: dict | None, default: str | None) -> dict:
    """``{"params.yaml": {"data": {...}}}`` -> flat keys, ``file:key`` except for ``default``."""
    out = {}
    for path, content in (section or {}).items():
        flat = flatten((content or {}).get("data") or {})
        out.update({(k if path == default else f"{path}:{k}"): v for k, v in flat.items()})
    return out


def _state(state: dict) -> tuple[dict, dict]:
    data = state.get("data") or {}
    return _files(data.get("params"), PARAMS_FILE), _files(data.get("metrics"), None)


def exp_rows(shown: list[dict]) -> list[ExpRow]:
    """The rows of ``dvc exp show --json``: the workspace, each baseline commit, its experiments."""
    rows: list[ExpRow] = []
    head: int | None = None
    workspace: int | None = None
    for entry in shown:
        params, metrics = _state(entry)
        if entry.get("rev") == "workspace":
            workspace = len(rows)
            rows.append(ExpRow("workspace", "workspace", params, metrics))
            continue
        base = len(rows)
        head = base if head is None else head
        rows.append(ExpRow(entry.get("name") or entry["rev"][:7], "baseline", params, metrics,
                           "failed" if entry.get("error") else "success"))
        for exp in entry.get("experiments") or []:
            state = exp["revs"][0]
            params, metrics = _state(state)
            status = (exp.get("executor") or {}).get("state") or ("failed" if state.get("error") else "success")
            rows.append(ExpRow(exp.get("name") or state.get("name") or state["rev"][:7], "experiment", params,
                               metrics, status, base))
    if workspace is not None:
        rows[workspace].baseline = head
    return rows


def differing(rows: list[ExpRow]) -> list[str]:
    """The param keys whose value is not the same in every row that has params (queued rows included)."""
    with_params = [r.params for r in rows if r.params]
    keys = sorted(set().union(*with_params)) if with_params else []
    return [k for k in keys if len({json.dumps(p.get(k), sort_keys=True) for p in with_params}) > 1]


def lookup(row_metrics: dict, key: str):
    """``key`` (``file:key``, or a bare key looked up in metrics/evaluate.json first, then any file)."""
    if ":" in key:
        return row_metrics.get(key)
    if f"{METRICS_FILE}:{key}" in row_metrics:
        return row_metrics[f"{METRICS_FILE}:{key}"]
    return next((v for k, v in row_metrics.items() if k.rsplit(":", 1)[-1] == key), None)


def format_exp_show(shown: list[dict], *, metrics: tuple[Headline, ...] = HEADLINE, width: int = WIDTH) -> str:
    """The experiments of ``dvc exp show --json`` as a table within ``width`` columns: name, headline
    metrics, and the params that differ between experiments (a baseline lists its values of them,
    the workspace and experiments what they set differently from their baseline)."""
    rows = exp_rows(shown)
    if not rows:
        return "no experiments"
    keys = differing(rows)
    last_of = {r.baseline: i for i, r in enumerate(rows) if r.kind == "experiment"}
    body = []
    for i, row in enumerate(rows):
        name = row.name
        if row.kind == "experiment":
            name = ("└─ " if last_of.get(row.baseline) == i else "├─ ") + name
        if row.state != "success":
            name += f" ({row.state})"
        values = [fmt_value(v) if (v := lookup(row.metrics, h.key)) is not None else "-" for h in metrics]
        if row.kind == "baseline":
            changed = [k for k in keys if k in row.params]
        else:
            base = rows[row.baseline].params if row.baseline is not None else {}
            changed = [k for k in keys if row.params.get(k) != base.get(k)]
        text = " ".join(f"{k}={fmt_value(row.params.get(k))}" for k in changed)
        if not row.params:  # a failed experiment without data
            text = ""
        elif row.kind != "baseline" and not changed:
            text = "(same params as baseline)"
        body.append([clip(name, 30), *values, text])
    head = ["experiment", *(h.label for h in metrics), "params that differ"]
    notes = ["params that differ: a baseline row lists its values, the other rows what they set differently",
             legend(metrics)]
    return "\n".join([table(head, body, width=width), *wrap_notes(notes, width)])


# ---- dvc metrics diff / params diff --json -> workspace vs HEAD ------------------------------

def format_metrics_show(diff: dict, params_diff: dict | None = None, *, metrics: tuple[Headline, ...] = HEADLINE,
                        width: int = WIDTH) -> str:
    """The headline metrics of ``dvc metrics diff --all --json`` (HEAD -> workspace) with the change and
    whether it is better, then the params that changed (``dvc params diff --json``)."""
    flat = {f"{path}:{key}": v for path, entries in (diff or {}).items() for key, v in (entries or {}).items()}
    body = []
    for h in metrics:
        entry = lookup(flat, h.key) or {}
        old, new = entry.get("old"), entry.get("new")
        change, verdict = "", ""
        if isinstance(old, (int, float)) and isinstance(new, (int, float)) and not isinstance(old, bool):
            delta = new - old
            change = "0" if delta == 0 else f"{delta:+.4g}"
            if delta and h.better:
                verdict = "better" if (delta < 0) == (h.better == "lower") else "worse"
        body.append([h.label, "-" if old is None else fmt_value(old), "-" if new is None else fmt_value(new),
                     change, verdict])
    head = ["metric", "HEAD", "workspace", "change", ""]
    lines = [table(head, body, width=width, min_last=0), *wrap_notes([legend(metrics)], width)]
    if params_diff is not None:
        changes = [f"{k if path == PARAMS_FILE else f'{path}:{k}'} {fmt_value(v.get('old'))} -> "
                   f"{fmt_value(v.get('new'))}"
                   for path, entries in params_diff.items() for k, v in sorted((entries or {}).items())]
        lines += textwrap.wrap("params changed since HEAD: " + (", ".join(changes) or "none"), width,
                               subsequent_indent="  ", break_on_hyphens=False)
    return "\n".join(lines)


# ---- commands --------------------------------------------------------------------------------

def cmd_exp_show(args) -> int:
    dvc_args = ["exp", "show"]
    if args.all_commits:
        dvc_args.append("--all-commits")
    if args.num:
        dvc_args += ["-n", str(args.num)]
    try:
        shown = run_dvc(dvc_args, args.root)
    except DvcCommandError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(format_exp_show(shown or [], metrics=headlines(args.metrics), width=args.width))
    return 0


def cmd_metrics_show(args) -> int:
    try:
        diff = run_dvc(["metrics", "diff", "--all"], args.root)
        params = run_dvc(["params", "diff"], args.root)
    except DvcCommandError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(format_metrics_show(diff or {}, params or {}, metrics=headlines(args.metrics), width=args.width))
    return 0


def width(text: str) -> int:
    value = int(text)
    if value < 40:
        raise argparse.ArgumentTypeError(f"{value} is too narrow: give at least 40 columns")
    return value


def add_parsers(sub) -> None:
    """``pokesprite exp show`` and ``pokesprite metrics show`` on the ``pokesprite`` command's subparsers."""
    common = {"--root": dict(default=".", help="the project folder (default: .)"),
              "--width": dict(type=width, default=WIDTH, help=f"at most this many columns (default: {WIDTH})"),
              "--metrics": dict(help="comma-separated metric keys of metrics/evaluate.json (default: "
                                     + ",".join(h.key for h in HEADLINE) + ")")}
    exp = sub.add_parser("exp", help="DVC experiments, readable").add_subparsers(dest="exp_command", required=True)
    show = exp.add_parser("show", help="each experiment's headline metrics and the params it changed",
                          description="One row per DVC experiment (from `dvc exp show --json`): the headline "
                                      "metrics and only the params that differ between experiments.")
    show.add_argument("-A", "--all-commits", action="store_true", help="experiments of every commit, not only HEAD")
    show.add_argument("-n", "--num", type=int, help="experiments of this many commits back from HEAD")
    for flag, kw in common.items():
        show.add_argument(flag, **kw)
    show.set_defaults(func=cmd_exp_show)
    met = sub.add_parser("metrics", help="headline metrics, readable").add_subparsers(dest="metrics_command",
                                                                                     required=True)
    mshow = met.add_parser("show", help="the headline metrics of the workspace against HEAD",
                           description="The headline evaluation metrics of the workspace against HEAD "
                                       "(`dvc metrics diff`), and the params changed since HEAD.")
    for flag, kw in common.items():
        mshow.add_argument(flag, **kw)
    mshow.set_defaults(func=cmd_metrics_show)
