"""The recipe's plumbing: stage markers (a finished stage leaves a ``.done`` file and is skipped next time),
logged child processes, the thread environment of a job, and running jobs side by side."""
import json
import logging
import os
import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from fairseq_quant_runtime.files import atomic_write

LOG_LINE = re.compile(r"\| (train_inner|valid on|train \||.*valid on|.*: WER )|^\[search\] ")

logger = logging.getLogger("recipe")


@contextmanager
def file_lock(directory: Path):
    """Hold an exclusive lock on ``directory`` (created if missing) while the block runs: parallel rows that share
    a stage (one co-trained model, one strategy search) run it once; the others wait, then reuse its result."""
    import fcntl

    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def done_marker(path: Path) -> Path:
    return path / ".done"


def mark_done(path: Path, info: dict) -> None:
    atomic_write(done_marker(path), json.dumps(info, indent=2) + "\n")


def run_logged(cmd: list[str], log_path: Path, env=None, tag: str = "") -> None:
    """Run a command, keep its whole output in ``log_path`` and echo progress lines (prefixed by ``tag``)."""
    logger.info("%s$ %s", f"[{tag}] " if tag else "", " ".join(cmd))
    with open(log_path, "a", buffering=1) as log:  # line-buffered: the log follows the command as it runs
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        for line in proc.stdout:
            log.write(line)
            if LOG_LINE.search(line):
                print(f"   {tag + ': ' if tag else ''}" + line.split(" | ", 2)[-1].strip()[:160], flush=True)
        if proc.wait() != 0:
            raise RuntimeError(f"command failed with exit code {proc.returncode}; see {log_path}")


def train_env(threads: int) -> dict:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(threads)
    return env


def parallel(jobs: int, calls: list[tuple]) -> list:
    """Run ``fn(*args)`` for each ``(fn, *args)`` in ``calls``, ``jobs`` at a time; results in order.

    Each call runs its work in a child process, so threads are enough here; the first failure is raised."""
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = [pool.submit(fn, *args) for fn, *args in calls]
        return [f.result() for f in futures]
