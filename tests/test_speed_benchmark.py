"""The benchmarks' measurements: a speed worker's peak memory is its own; the QAT curve's points are the checkpoints
of their update counts."""
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


def test_the_qat_curve_leaves_out_a_point_without_its_checkpoint(tmp_path):
    """fairseq writes no interval checkpoint where an epoch ends; the curve used checkpoint_last.pt (the final
    model) in its place."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.qat_curve import curve_checkpoint

    for name in ("checkpoint_2_400.pt", "checkpoint_last.pt", "start.pt"):
        (tmp_path / name).write_bytes(b"")
    start = tmp_path / "start.pt"
    assert curve_checkpoint(tmp_path, 0, 1200, start) == start
    assert curve_checkpoint(tmp_path, 400, 1200, start) == tmp_path / "checkpoint_2_400.pt"
    assert curve_checkpoint(tmp_path, 800, 1200, start) is None
    assert curve_checkpoint(tmp_path, 1200, 1200, start) == tmp_path / "checkpoint_last.pt"
