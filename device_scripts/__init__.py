"""Scripts that run on a phone (POSIX sh for toybox/mksh, the frida agent, the strace recipe).

This package only ships the files; :func:`script_path` finds one.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def script_path(name: str) -> Path:
    """Path of a shipped device script such as ``netstat_poller.sh``."""
    p = Path(str(resources.files(__package__).joinpath(name)))
    if not p.is_file():
        raise FileNotFoundError(f"device script {name!r} is not shipped in {p.parent}")
    return p
