"""uid -> package map from ``pm list packages -U`` (and process names to labels).

Lines look like ``package:com.whatsapp uid:10123``; with ``-f`` the apk path comes first
(``package:/data/app/.../base.apk=com.whatsapp uid:10123``); a package installed for
several users lists each uid (``uid:10123,1010123``). Packages sharing a uid
(``android:sharedUserId``) all map from it, so such a uid names several packages.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

from analysis.errors import ParseError
from analysis.traces.model import ParseStats, split_process

__all__ = ["iter_package_uids", "load_uid_map", "split_process"]

_RE_LINE = re.compile(r"^package:(?:(?:\S*=)?)([A-Za-z0-9_.]+)\s+uid:([\d,]+)")


def iter_package_uids(source: str | os.PathLike[str] | Iterable[str],
                      stats: ParseStats | None = None) -> Iterable[tuple[str, int]]:
    """(package, uid) pairs of ``pm list packages -U`` output, lazily."""
    st = stats if stats is not None else ParseStats()
    if isinstance(source, (str, os.PathLike)):
        try:
            lines: Iterable[str] = Path(source).read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError as e:
            raise ParseError(source, None, f"cannot read package list: {e.strerror or e}") from None
    else:
        lines = source
    for line in lines:
        st.lines += 1
        s = line.strip()
        if not s:
            continue
        m = _RE_LINE.match(s)
        if m is None:
            st.skip("not a package line")
            continue
        st.parsed += 1
        for u in m.group(2).split(","):
            if u and len(u) <= 10:  # a uid is 32 bits; longer digit runs are damage
                yield m.group(1), int(u)
            elif u:
                st.skip("uid out of range")


def load_uid_map(source: str | os.PathLike[str] | Iterable[str],
                 stats: ParseStats | None = None) -> dict[int, tuple[str, ...]]:
    """uid -> sorted packages (more than one only for a shared uid)."""
    out: dict[int, set[str]] = {}
    for pkg, uid in iter_package_uids(source, stats):
        out.setdefault(uid, set()).add(pkg)
    return {u: tuple(sorted(p)) for u, p in out.items()}
