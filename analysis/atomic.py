"""Atomic outputs: write beside the target, rename into place, never leave half a file.

Every writer of the analysis library goes through :func:`atomic_output`, so a full disk
or a crash leaves either the old file or the new one, and a known failure becomes one
:class:`~analysis.errors.OutputError` naming the path. A set of files that belong together
(``flowtruth label``'s outputs) goes through :func:`atomic_dir`: it is written into a
directory beside the target and swapped in whole, so a reader (or a crash) sees the
complete old set or the complete new one, never a mix.

Temp names carry the writer's pid (``.<name>.<pid>.<hex>.tmp``, ``.<name>.<pid>.<hex>.new``
or ``.old``); the next writer into the same directory removes those of writers that are
no longer alive (:func:`clean_stale`), so a ``kill -9`` leaves no temp file behind for long.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

from .errors import OutputError


def _create_temp(path: Path) -> tuple[int, str]:
    """A new temp file beside ``path`` (same file system, so os.replace is atomic).

    Unlike mkstemp's 0600, the mode follows the umask, as a plain open() would.
    """
    while True:
        tmp = str(path.parent / f".{path.name}.{os.getpid()}.{_token()}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue


SET_MANIFEST = ".flowtruth-set.json"
"""Written into every output set: the files of the set, so the next set knows which
files of the directory it supersedes and which it must keep (files others put there)."""
_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d{1,10})\.(?P<host>[0-9a-f]{4})[0-9a-f]{4}"
                      r"\.(?P<kind>tmp|new|old)$")
# A pid is only meaningful on its own host (an output directory may sit on a shared file
# system): temp names carry 16 bits of the host name, and only ours are cleaned.
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:4]


def _token() -> str:
    """The hex group of a temp name: this host's tag and 16 random bits."""
    return _HOST + secrets.token_hex(2)


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (a pid we may not signal counts)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return pid < 1 << 31
    return True


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            p.unlink()


def clean_stale(directory: str | os.PathLike[str], name: str | None = None) -> int:
    """Remove the temp files and set directories in ``directory`` left by writers that are
    no longer alive (of target ``name`` only, when given); returns how many went.

    An output set cut between its two renames (no atomic exchange on this file system) is
    finished first: a missing target gets its complete new set back, else its old set.
    """
    d = Path(directory)
    try:
        entries = list(os.scandir(d))
    except OSError:
        return 0
    stale: list[tuple[Path, str, str]] = []
    for e in entries:
        m = _TEMP_RE.match(e.name)
        if m is None or m["host"] != _HOST or (name is not None and m["name"] != name):
            continue
        if int(m["pid"]) == os.getpid() or pid_alive(int(m["pid"])):
            continue
        stale.append((Path(e.path), m["name"], m["kind"]))
    for kind in ("new", "old"):  # recovery: a complete new set first, else the old one
        for p, target, k in stale:
            if k == kind and not (d / target).exists() and (
                    kind == "old" or (p / SET_MANIFEST).is_file()):
                with contextlib.suppress(OSError):
                    os.rename(p, d / target)
    n = 0
    for p, _target, _k in stale:
        if os.path.lexists(p):
            _remove(p)
            n += 1
    return n


_CLEANED: set[str] = set()


def _clean_once(directory: Path) -> None:
    """:func:`clean_stale` on the first write into ``directory`` in this process (a writer
    of thousands of files into one folder scans it once, not once per file)."""
    key = os.path.abspath(directory)
    if key not in _CLEANED:
        _CLEANED.add(key)
        clean_stale(directory)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str]) -> Iterator[str]:
    """Yield a temp path beside ``path``; on success it replaces ``path``, else it is removed."""
    target = Path(path)
    tmp: str | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _clean_once(target.parent)
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


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False if unsupported."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: the file system cannot
        return False
    raise OSError(err, os.strerror(err), str(b))


def _set_files(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*")
                  if not p.is_dir() and p.name != SET_MANIFEST)


def _listed(d: Path) -> set[str]:
    try:
        files = json.loads((d / SET_MANIFEST).read_text())["files"]
        return {str(f) for f in files}
    except (OSError, ValueError, KeyError, TypeError):
        return set()


def _foreign(old: Path, new_files: set[str]) -> list[Path]:
    """Files of ``old`` that belong to neither its own set nor the new one."""
    listed = _listed(old)
    out = []
    for p in old.rglob("*"):
        if p.is_dir() and not p.is_symlink():
            continue
        rel = str(p.relative_to(old))
        if p.name == SET_MANIFEST or rel in listed or rel in new_files or _TEMP_RE.match(p.name):
            continue
        out.append(p)
        break  # one is enough to decide
    return out


def _move_files(new: Path, target: Path, files: list[str]) -> None:
    """The new set moved file by file into a directory that also holds others' files;
    files of the previous set that the new one lacks are removed."""
    old_listed = _listed(target)
    for rel in files:
        dest = target / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(new / rel, dest)
    for rel in old_listed - set(files):
        with contextlib.suppress(OSError):
            (target / rel).unlink()
    os.replace(new / SET_MANIFEST, target / SET_MANIFEST)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty directory beside ``path`` to write a set of outputs into; on success
    it takes the place of ``path`` in one atomic exchange, on failure (or a crash) it is
    removed and ``path`` is untouched. Written into the set: :data:`SET_MANIFEST` (its
    file list). When ``path`` also holds files that are not flowtruth's (neither the
    previous set nor the new one), the directory is kept and only the set's files are
    replaced, one atomic rename each."""
    target = Path(os.path.abspath(path))
    parent = target.parent
    new: Path | None = None
    try:
        parent.mkdir(parents=True, exist_ok=True)
        clean_stale(parent, target.name)
        if target.exists() and not target.is_dir():
            raise OutputError(f"{target} exists and is not a directory")
        new = parent / f".{target.name}.{os.getpid()}.{_token()}.new"
        new.mkdir()
        yield new
        files = _set_files(new)
        (new / SET_MANIFEST).write_text(json.dumps({"files": files}, indent=1) + "\n")
        if not target.exists():
            os.rename(new, target)
            new = None
            return
        if _foreign(target, set(files)):
            # others' files live here (the directory may be a working directory): they
            # stay put, and the set moves in file by file, each file still atomic
            _move_files(new, target, files)
            return
        if _exchange(new, target):
            _remove(new)  # now the old set
            new = None
            return
        old = parent / f".{target.name}.{os.getpid()}.{_token()}.old"
        os.rename(target, old)  # a crash here is finished by the next clean_stale
        os.rename(new, target)
        new = None
        _remove(old)
    except OSError as err:
        raise OutputError(f"cannot write {target}: {err.strerror or err}") from err
    finally:
        if new is not None:
            _remove(new)
