"""pokesprite.malloc_settings: the commands' C allocator settings, checked in fresh processes by the
page faults that reusing a freed 64 MiB block costs."""
from __future__ import annotations

import platform
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the settings are glibc's")

# Page faults of filling a new 64 MiB block, the second time one is made (the first was freed).
PROBE = textwrap.dedent("""
    import resource

    def faults_of_a_64_mib_block():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = bytearray(b"x") * (64 << 20)  # every page written
        del block
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    faults_of_a_64_mib_block()
    print(faults_of_a_64_mib_block())
""")
PAGES = (64 << 20) // 4096  # 16384 pages of 4 KiB


def faults(setup: str) -> int:
    out = subprocess.run([sys.executable, "-c", setup + PROBE], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return int(out.stdout.split()[-1])


def test_by_default_a_freed_block_goes_back_to_the_system_and_is_faulted_in_again():
    assert faults("") > PAGES * 0.9


def test_commands_keep_freed_memory_for_reuse():
    setup = "from pokesprite import malloc_settings\nassert malloc_settings.for_commands()\n"
    assert faults(setup) < PAGES * 0.05


@pytest.mark.parametrize("module", ["flows.run", "pokesprite.cli"])
def test_the_commands_use_them(module):
    """Both entry points set them first thing, even when their arguments are refused."""
    setup = f"import {module} as m\ntry:\n    m.main(['--no-such-option'])\nexcept SystemExit:\n    pass\n"
    assert faults(setup) < PAGES * 0.05


def test_importing_pokesprite_keeps_the_defaults():
    assert faults("import pokesprite.stages, pokesprite.registry, flows.pipeline\n") > PAGES * 0.9
