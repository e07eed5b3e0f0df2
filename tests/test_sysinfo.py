"""Process memory figures the benchmarks report (util/sysinfo.py), against /proc and a child."""
import ctypes.util
import os
import subprocess
import sys

import pytest

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
