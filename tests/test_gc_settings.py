"""pokesprite.gc_settings: the commands' garbage-collector settings, checked in fresh processes."""
from __future__ import annotations

import gc
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT

# A reference cycle whose finaliser prints: only a garbage collection can finalise it, and with
# collections off (gc.disable) the only one left is the interpreter's last, at exit.
SCRIPT = textwrap.dedent("""
    import gc, sys
    from pokesprite import gc_settings
    if sys.argv[1] == "commands":
        gc_settings.for_commands()
        gc_settings.for_commands()  # twice: still one exit handler
    gc.disable()

    class Noisy:
        def __del__(self):
            print("finalised", flush=True)

    cycle = Noisy()
    cycle.me = cycle
    del cycle
    print("thresholds", *gc.get_threshold(), flush=True)
""")


def python(*args: str) -> list[str]:
    out = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.splitlines()


DEFAULTS = " ".join(map(str, gc.get_threshold()))  # this interpreter's (pytest leaves them alone)
OLDER = DEFAULTS.split(" ", 1)[1]  # the older generations' thresholds


def test_python_defaults_finalise_a_cycle_at_exit():
    assert python("-c", SCRIPT, "default") == [f"thresholds {DEFAULTS}", "finalised"]


def test_commands_collect_young_objects_less_often_and_skip_the_last_collection():
    assert python("-c", SCRIPT, "commands") == [f"thresholds 10000 {OLDER}"]


@pytest.mark.parametrize("module", ["flows.run", "pokesprite.cli"])
def test_the_commands_use_them(module):
    """Both entry points set them first thing, even when their arguments are refused."""
    probe = (f"import gc, {module} as m\ntry:\n    m.main(['--no-such-option'])\nexcept SystemExit:\n    pass\n"
             "print(*gc.get_threshold())")
    assert python("-c", probe)[-1] == f"10000 {OLDER}"


def test_importing_pokesprite_keeps_python_defaults():
    probe = "import gc, pokesprite.stages, pokesprite.registry, flows.pipeline\nprint(*gc.get_threshold())"
    assert python("-c", probe) == [DEFAULTS]
