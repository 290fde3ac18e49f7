"""Garbage-collector settings for pokesprite's own short-lived commands (a DVC stage, ``pokesprite ...``).

A stage's process holds a few million long-lived Python objects (the modules of torch, transformers,
MLflow and Prefect) and makes little cyclic garbage of its own, yet CPython's defaults collect as if
the opposite were true: a young-generation pass every 700 new objects, repeated full passes over the
whole heap while the imports grow it, and one last full pass at exit that frees nothing the
operating system would not. On 2 CPU cores that was about 5 s of a tiny stage's 18 s
(``benchmarks/gc_settings.py`` measures it).

``for_commands`` changes two things, for the process that calls it only (importing pokesprite as a
library keeps Python's defaults):

* young collections every 10,000 new objects instead of 700 (the older generations' thresholds stay);
* at exit, after every other exit handler has run, the surviving objects are frozen
  (``gc.freeze``), so the interpreter's final collection has nothing to visit.

Nothing else about exit changes: exit handlers run, modules are torn down, and objects that are not in
reference cycles are finalised as before. Objects still in a cycle at exit are not (Python never
promised that they would be): pokesprite closes its files and ends its runs explicitly.
"""
from __future__ import annotations

import atexit
import gc

YOUNG_THRESHOLD = 10_000
_freeze_at_exit = False


def for_commands() -> None:
    """Use the settings above in this process; call it first thing in a command's ``main``."""
    global _freeze_at_exit
    gc.set_threshold(YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    if not _freeze_at_exit:  # exit handlers run last-registered first: registered early, it runs late
        atexit.register(gc.freeze)
        _freeze_at_exit = True
