"""Writing outputs without ever leaving a half-written file: every result file, model file and checkpoint of the
project goes through :func:`atomic_output` (a temporary name in the same directory, renamed over the target only
when the writer finished). Files get the permissions ``open()`` would give them (``0666`` less the umask), not the
``0600`` of a bare ``mkstemp``. Plain Python: the runtime and the fairseq plugin share it."""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_output(path: str | os.PathLike, fsync: bool = False):
    """Yield a temporary path beside ``path``; when the block finishes, the file written there replaces ``path``
    (on an error it is removed and ``path`` is left as it was). Parent directories are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike, data: str | bytes, fsync: bool = False) -> None:
    """Write ``data`` (text as UTF-8, or bytes) to ``path`` atomically."""
    with atomic_output(path, fsync=fsync) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding="utf-8")


__all__ = ["atomic_output", "atomic_write"]
