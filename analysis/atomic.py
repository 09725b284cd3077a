"""Atomic outputs: write beside the target, rename into place, never leave half a file.

Every writer of the analysis library goes through :func:`atomic_output`, so a full disk
or a crash leaves either the old file or the new one, and a known failure becomes one
:class:`~analysis.errors.OutputError` naming the path.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

from .errors import OutputError


def _create_temp(path: Path) -> tuple[int, str]:
    """A new temp file beside ``path`` (same file system, so os.replace is atomic).

    Unlike mkstemp's 0600, the mode follows the umask, as a plain open() would.
    """
    while True:
        tmp = str(path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str]) -> Iterator[str]:
    """Yield a temp path beside ``path``; on success it replaces ``path``, else it is removed."""
    target = Path(path)
    tmp: str | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _create_temp(target)
        os.close(fd)
        yield tmp
        os.replace(tmp, target)
        tmp = None
    except OSError as err:
        raise OutputError(f"cannot write {target}: {err.strerror or err}") from err
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def atomic_write(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
