"""uid -> package map from ``pm list packages -U`` (and process names to labels).

Lines look like ``package:com.whatsapp uid:10123``; with ``--show-versioncode`` AOSP
(``PackageManagerShellCommand.runListPackages``) prints the version code before the uid
(``package:com.whatsapp versionCode:252370004 uid:10123``, the form the session engine
writes to ``packages.txt``); with ``-f`` the apk path comes first
(``package:/data/app/.../base.apk=com.whatsapp uid:10123``); a package installed for
several users lists each uid (``uid:10123,1010123``). Fields after the name are read by
their key in any order, so other builds' orders and extra fields (``installer=``) do not
matter; CRLF line ends (old phones, Windows redirects) are stripped. Packages sharing a
uid (``android:sharedUserId``) all map from it, so such a uid names several packages.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

from analysis.errors import ParseError
from analysis.traces.model import ParseStats, split_process

__all__ = ["iter_package_uids", "load_uid_map", "split_process"]

_RE_NAME = re.compile(r"^package:(?:\S*=)?([A-Za-z0-9_.]+)(?=\s|$)")
_RE_UID = re.compile(r"(?:^|\s)uid:(\d+(?:,\d+)*)(?=\s|$)")


def iter_package_uids(source: str | os.PathLike[str] | Iterable[str],
                      stats: ParseStats | None = None) -> Iterable[tuple[str, int]]:
    """(package, uid) pairs of ``pm list packages -U`` output, lazily."""
    st = stats if stats is not None else ParseStats()
    if isinstance(source, (str, os.PathLike)):
        try:
            raw = Path(source).read_bytes()
        except OSError as e:
            raise ParseError(source, None, f"cannot read package list: {e.strerror or e}") from None
        # A Windows redirect of ``adb shell pm list packages`` is UTF-16 with a BOM.
        enc = "utf-16" if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else "utf-8"
        lines: Iterable[str] = raw.decode(enc, errors="replace").splitlines()
    else:
        lines = source
    for line in lines:
        st.lines += 1
        s = line.strip().lstrip("\ufeff")
        if not s:
            continue
        m = _RE_NAME.match(s)
        if m is None:
            st.skip("not a package line")
            continue
        u = _RE_UID.search(s, m.end())
        if u is None:
            st.skip("package line without uid (pm list packages needs -U)")
            continue
        st.parsed += 1
        for part in u.group(1).split(","):
            if part and len(part) <= 10:  # a uid is 32 bits; longer digit runs are damage
                yield m.group(1), int(part)
            elif part:
                st.skip("uid out of range")


def load_uid_map(source: str | os.PathLike[str] | Iterable[str],
                 stats: ParseStats | None = None) -> dict[int, tuple[str, ...]]:
    """uid -> sorted packages (more than one only for a shared uid)."""
    out: dict[int, set[str]] = {}
    for pkg, uid in iter_package_uids(source, stats):
        out.setdefault(uid, set()).add(pkg)
    return {u: tuple(sorted(p)) for u, p in out.items()}
