"""Progress bars for long loops, shown only where someone is watching."""
from __future__ import annotations

import os

from tqdm import tqdm

from pokesprite.train import distributed


def progress(iterable, **kwargs):
    """tqdm that shows only on an interactive terminal, never in CI logs ($CI or a pipe) and only in
    process 0 of a distributed run."""
    disable = True if os.environ.get("CI") or not distributed.is_main() else None
    return tqdm(iterable, disable=disable, dynamic_ncols=True, **kwargs)
