"""Where ``build_strace.sh`` caches its static strace binaries, and which one a device needs.

The layout is ``${XDG_CACHE_HOME:-~/.cache}/flowtruth/strace/<version>/<abi>/strace`` with
``strace.sha256`` beside it; ``<abi>`` is Android's name (``getprop ro.product.cpu.abi``).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

STRACE_VERSION = "6.1"
"""Upstream version that ``build_strace.sh`` pins (Debian bookworm's ``6.1-0.1``)."""

_ABI_ALIASES = {
    "arm64-v8a": "arm64-v8a",
    "aarch64": "arm64-v8a",
    "arm64": "arm64-v8a",
    "armeabi-v7a": "armeabi-v7a",
    "armeabi": "armeabi-v7a",
    "armhf": "armeabi-v7a",
    "arm": "armeabi-v7a",
}
ABIS: tuple[str, ...] = ("arm64-v8a", "armeabi-v7a")


def normalize_abi(abi: str) -> str | None:
    """Android's ABI name for ``abi`` (``aarch64`` -> ``arm64-v8a``), or None if unbuilt."""
    return _ABI_ALIASES.get(abi.strip().lower())


def strace_cache_dir(version: str = STRACE_VERSION) -> Path:
    """The cache directory of one strace version."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "flowtruth" / "strace" / version


def cached_strace(abi: str, version: str = STRACE_VERSION) -> Path | None:
    """The cached binary for a device ABI if it exists and matches its ``.sha256``."""
    name = normalize_abi(abi)
    if name is None:
        return None
    binary = strace_cache_dir(version) / name / "strace"
    digest_file = binary.with_name("strace.sha256")
    try:
        want = digest_file.read_text(encoding="ascii").split()[0]
        have = hashlib.sha256(binary.read_bytes()).hexdigest()
    except (OSError, IndexError, UnicodeDecodeError):
        return None
    return binary if want == have else None
