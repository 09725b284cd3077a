"""Untrusted strings from phones and files: file names that stay where they belong, and
text that cannot drive the technician's terminal.

A phone is not trusted: its adbd answers whatever it likes (model, serial, package
names, file listings), so

* :func:`safe_name` turns a device- or plan-derived string (model, serial, package,
  activity, device name) into one harmless path component;
* :func:`safe_join` builds a path under a base directory from parts and refuses ``..``,
  absolute parts, NUL, empty or overlong components, and anything that resolves (through
  symlinks) outside the base: :class:`UnsafePath`;
* :func:`plain` strips control characters (ESC sequences, C1 controls, carriage returns)
  from a string before it reaches a terminal, and :func:`markup` also escapes rich
  markup (``[bold red]``), for strings printed through rich consoles or Textual widgets.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from controller.errors import ControllerError

MAX_COMPONENT = 120
"""Longest path component built from an untrusted string (file systems allow 255 bytes)."""

_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
# C0 controls but tab/newline, DEL, C1 controls, and the Unicode bidi/format overrides
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


class UnsafePath(ControllerError):
    """A path built from an untrusted value would leave its directory."""


def safe_name(value: object, *, default: str = "_", limit: int = MAX_COMPONENT) -> str:
    """One path component from an untrusted string: letters, digits, ``.``, ``_`` and
    ``-`` only (runs of anything else become ``-``), never starting with a dot or dash
    (so never ``.``/``..`` nor an option), at most ``limit`` characters; ``default`` when
    nothing is left."""
    s = _UNSAFE_CHARS.sub("-", str(value)).lstrip(".-")[:limit].rstrip("-")
    return s or default


def safe_join(base: str | os.PathLike[str], *parts: str) -> Path:
    """``base / parts...``, refusing what could leave ``base``: an absolute part, a ``..``
    or empty component, NUL, a component over 255 bytes, and a result that does not
    resolve (following symlinks that exist) to inside ``base``. Raises :class:`UnsafePath`
    naming the part."""
    root = Path(base)
    rel: list[str] = []
    for part in parts:
        s = os.fspath(part)
        if "\x00" in s:
            raise UnsafePath(f"refused the path {plain(s)!r}: it holds a NUL byte")
        if s.startswith("/") or os.path.isabs(s):
            raise UnsafePath(f"refused the path {plain(s)!r}: it is absolute")
        for comp in s.split("/"):
            if comp in ("", "."):
                raise UnsafePath(f"refused the path {plain(s)!r}: an empty or '.' component")
            if comp == "..":
                raise UnsafePath(f"refused the path {plain(s)!r}: it climbs out with '..'")
            if len(comp.encode("utf-8", "surrogateescape")) > 255:
                raise UnsafePath(f"refused the path {plain(s[:60])!r}...: a component "
                                 "longer than 255 bytes")
            rel.append(comp)
    out = root.joinpath(*rel)
    real_root = os.path.realpath(root)
    real = os.path.realpath(out)
    if real != real_root and not real.startswith(real_root.rstrip("/") + "/"):
        raise UnsafePath(f"refused the path {plain('/'.join(rel))!r}: it resolves to "
                         f"{plain(real)}, outside {plain(real_root)}")
    return out


def plain(value: object) -> str:
    """``value`` as text without control characters (ESC, CR, C1, bidi overrides): safe
    to write to a terminal (rich markup is left as it is; see :func:`markup`)."""
    return _CONTROL.sub("", str(value))


def markup(value: object) -> str:
    """``value`` as text safe inside rich/Textual markup: control characters removed and
    ``[`` escaped, so ``[bold red]`` prints as itself."""
    from rich.markup import escape

    return escape(plain(value))


def clean_event(e: Any) -> Any:
    """An engine event with :func:`plain` applied to every string field (and the strings in
    tuple fields): what a front end shows of a phone's answers cannot drive its terminal."""
    import dataclasses

    if not dataclasses.is_dataclass(e) or isinstance(e, type):
        return e
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(e):
        v = getattr(e, f.name)
        if isinstance(v, str):
            c: Any = plain(v)
        elif isinstance(v, tuple) and any(isinstance(x, str) for x in v):
            c = tuple(plain(x) if isinstance(x, str) else x for x in v)
        else:
            continue
        if c != v:
            changes[f.name] = c
    return dataclasses.replace(e, **changes) if changes else e
