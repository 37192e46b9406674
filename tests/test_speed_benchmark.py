"""The speed benchmark's measurements: a worker's peak memory is its own."""
import subprocess
import sys

from conftest import ROOT


def test_a_workers_peak_memory_is_its_own_not_its_parents():
    """benchmarks/decode_speed.py starts one worker process per row from a driver that may hold hundreds of MB
    (it exports models with torch); Linux keeps the parent's peak in getrusage's ru_maxrss across fork and exec,
    which made every runtime row report about 0.7 GB."""
    ballast = b"\x01" * (400 * 2**20)  # 400 MB resident in this (parent) process
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); import resource; "
            "from benchmarks.decode_speed import peak_rss_mb; "
            "print(peak_rss_mb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    own, inherited = map(float, proc.stdout.split())
    assert len(ballast) == 400 * 2**20
    assert inherited > 400  # what the benchmark reported before
    assert 5 < own < 150  # a Python interpreter with numpy and the runtime's decoding module
