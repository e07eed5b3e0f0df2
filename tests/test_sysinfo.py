"""Process memory figures the benchmarks report (util/sysinfo.py), against /proc and a child; and
how idle OpenMP threads are told to wait (util/threads.py), against a busy child."""
import ctypes.util
import os
import subprocess
import sys

import pytest

from bsharedrag_fast.util import threads
from bsharedrag_fast.util.sysinfo import peak_rss_bytes, release_free_heap, rss_bytes, tree_peak_rss_bytes

MB = 2**20


@pytest.mark.skipif(sys.platform != "linux" or not ctypes.util.find_library("c"), reason="malloc_trim is glibc's")
def test_release_free_heap_gives_freed_heap_pages_back():
    blocks = [bytearray(64 * 1024) for _ in range(3000)]  # ~190 MB from malloc's heap (below its mmap threshold)
    del blocks[::2]  # holes inside the heap, which free() alone keeps
    before = rss_bytes()
    release_free_heap()
    assert rss_bytes() < before - 50 * MB
    del blocks


@pytest.mark.skipif(sys.platform != "linux", reason="/proc")
def test_tree_peak_counts_the_children():
    child = subprocess.Popen([sys.executable, "-c", "import sys; b = bytearray(200 * 2**20); sys.stdin.read()"],
                             stdin=subprocess.PIPE)
    try:
        for _ in range(200):  # until the child has touched its 200 MB
            if tree_peak_rss_bytes(child.pid) > 200 * MB:
                break
            subprocess.run(["sleep", "0.05"])
        own = peak_rss_bytes()
        assert tree_peak_rss_bytes(child.pid) > 200 * MB
        assert tree_peak_rss_bytes(os.getpid()) >= own + 200 * MB
    finally:
        child.communicate(b"")
    assert tree_peak_rss_bytes(child.pid) == 0  # ended: nothing to count


def test_choose_wait_policy_spins_only_on_idle_cores_and_never_overrides_the_user(monkeypatch):
    monkeypatch.setattr(threads, "WAIT_POLICY", threads.WAIT_POLICY)  # this process's choice, restored after
    env = {}
    assert threads.choose_wait_policy(env, busy=0.0) == "spin" and env == {"GOMP_SPINCOUNT": str(threads.SPIN_COUNT)}
    for busy in (threads.IDLE_BELOW, 1.5, None):  # busy, or unknown (no /proc/stat): sleep
        env = {}
        assert threads.choose_wait_policy(env, busy=busy) == "passive" and env == {"OMP_WAIT_POLICY": "PASSIVE"}
    for chosen in ({"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "0"}):
        env = dict(chosen)
        assert threads.choose_wait_policy(env, busy=0.0) == "user" and env == chosen


@pytest.mark.skipif(sys.platform != "linux", reason="/proc/stat")
def test_busy_cores_sees_a_busy_process_on_our_cores():
    cpu = min(os.sched_getaffinity(0))
    child = subprocess.Popen([sys.executable, "-c", f"import os; os.sched_setaffinity(0, {{{cpu}}})\nwhile True: pass"])
    try:
        import time

        time.sleep(0.3)  # started and spinning
        assert threads.busy_cores(0.3) >= 0.7
    finally:
        child.kill()
        child.wait()


def test_importing_the_package_first_chooses_and_a_user_choice_stands():
    code = ("import os, bsharedrag_fast; from bsharedrag_fast.util import threads; "
            "print(threads.WAIT_POLICY, os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out in (["spin", "None", str(threads.SPIN_COUNT)], ["passive", "PASSIVE", "None"])
    out = subprocess.run([sys.executable, "-c", code], env=dict(env, OMP_WAIT_POLICY="ACTIVE"), capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == ["user", "ACTIVE", "None"]


MALLOC_PROBE = """
import ctypes, resource
import bsharedrag_fast
from bsharedrag_fast.util import malloc
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
n = 20 << 20
def step():  # three 20 MB blocks, as a prefill layer's activations: allocated, written, freed
    blocks = [libc.malloc(n) for _ in range(3)]
    for b in blocks:
        ctypes.memset(b, 1, n)
    for b in blocks:
        libc.free(b)
step(), step()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print(malloc.POLICY)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's malloc")
@pytest.mark.parametrize("env", [{}, {"BSHAREDRAG_MALLOC": "default"}, {"MALLOC_TRIM_THRESHOLD_": "131072"}])
def test_freed_memory_is_reused_unless_the_user_chose(env):
    """Importing the package keeps freed blocks in the heap: steps that allocate, write and free
    three 20 MB blocks fault no page after the first steps, where glibc's defaults hand the
    blocks back and fault all ~15000 pages in again at every step; a user's choice (or the
    opt-out) is left alone."""
    run = subprocess.run([sys.executable, "-c", MALLOC_PROBE], capture_output=True, text=True,
                         env={**{k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}, **env})
    assert run.returncode == 0, run.stderr[-2000:]
    policy, faults = run.stdout.split("\n")[-3:-1]
    if not env:
        assert policy.startswith("keep freed memory") and int(faults) < 1000, (policy, faults)
    else:
        assert policy.startswith("left alone") and int(faults) > 5 * 10000, (policy, faults)


@pytest.mark.parametrize("user", [None, "7"])
def test_the_package_caps_onednns_primitive_cache_unless_the_user_sized_it(user):
    code = ("import os, bsharedrag_fast; from bsharedrag_fast.util import malloc; "
            "print(os.environ.get('ONEDNN_PRIMITIVE_CACHE_CAPACITY'), malloc.SET_VARIABLES, malloc.POLICY)")
    env = {k: v for k, v in os.environ.items() if "PRIMITIVE_CACHE_CAPACITY" not in k}
    if user is not None:
        env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = user
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    if user is None:
        assert out.startswith("32 ['ONEDNN_PRIMITIVE_CACHE_CAPACITY']") and "oneDNN primitive cache 32" in out
    else:
        assert out.startswith("7 []") and "oneDNN primitive cache left alone" in out
