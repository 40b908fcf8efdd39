"""train/malloc.py: a freed block of a step's size is reused from the heap (no page faults
the next time), glibc's defaults map it anew; the user's own malloc knobs win."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from train.malloc import tunes_malloc

# 40 rounds of malloc, touch and free of one 8 MB block (a step's tensor); prints whether
# the settings were applied and the page faults after the first round
SCRIPT = """
import ctypes, resource
from train.malloc import keep_step_memory
applied = keep_step_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def round_trip():
    p = libc.malloc(8 << 20)
    ctypes.memset(p, 1, 8 << 20)
    libc.free(p)
round_trip()
f0 = faults()
for _ in range(40):
    round_trip()
print(applied, faults() - f0)
"""

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")


def run(**env) -> tuple[str, int]:
    clean = {k: v for k, v in os.environ.items() if not (tunes_malloc(k) or k == "ESMM_MALLOC")}
    out = subprocess.run([sys.executable, "-c", SCRIPT], env={**clean, **env}, capture_output=True, text=True,
                         check=True)
    applied, faults = out.stdout.split()
    return applied, int(faults)


def test_a_freed_step_sized_block_is_reused_without_page_faults():
    applied, faults = run()
    assert applied == "True"
    assert faults < 200  # 40 rounds of 2,048 pages each would be 81,920
    # glibc's defaults map the same-sized block anew at least once more after the first
    # free (2,048 faults here): what the settings are for
    applied, faults = run(ESMM_MALLOC="default")
    assert applied == "False" and faults >= 2000


@pytest.mark.parametrize("env", [{"MALLOC_ARENA_MAX": "2"}, {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}])
def test_the_users_own_malloc_settings_win(env):
    assert run(**env)[0] == "False"
