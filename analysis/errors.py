"""The error tree of the analysis library.

Every known failure is one of these; front ends print ``str(err)`` as a single
line (plus the hint) and never a traceback.
"""

from __future__ import annotations

import os

NAME_LIMIT = 200
"""Longest file or field name echoed in a message; longer ones keep their two ends."""
LINE_LIMIT = 2000
"""Longest error line a front end prints."""


def short(text: object, limit: int = NAME_LIMIT) -> str:
    """``text`` with control characters escaped, at most ``limit`` characters (a middle
    ellipsis marks a cut), so a hostile file name cannot flood or drive a terminal."""
    s = str(text)
    if len(s) > limit:
        half = (limit - 1) // 2
        s = s[:half] + "\u2026" + s[-(limit - 1 - half):]
    if any(c < " " or "\x7f" <= c <= "\x9f" for c in s):
        s = "".join(c if c >= " " and not "\x7f" <= c <= "\x9f"
                    else c.encode("unicode_escape").decode("ascii") for c in s)
    return s


class FlowtruthError(Exception):
    """Base of every known flowtruth failure: a message and an optional hint."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message

    def one_line(self) -> str:
        """The message and the hint on one line (control characters escaped, at most
        :data:`LINE_LIMIT` characters), as a CLI prints it."""
        text = f"{self.message} ({self.hint})" if self.hint else self.message
        return short(text, LINE_LIMIT)


class AnalysisError(FlowtruthError):
    """A failure inside the analysis library."""


class BadInputError(AnalysisError):
    """Input given by the user cannot be used; the CLI exits with status 2."""

    exit_code = 2


class ParseError(BadInputError):
    """A file cannot be parsed: names the file, the byte offset or line, and why."""

    def __init__(
        self,
        path: str | os.PathLike[str] | None,
        where: str | int | None,
        reason: str,
        hint: str | None = None,
    ) -> None:
        self.path = None if path is None else os.fspath(path)
        self.where = where
        self.reason = reason
        loc = short(self.path) if self.path else "<input>"
        if isinstance(where, int):
            loc += f": byte offset {where}"
        elif where:
            loc += f": {short(where)}"
        super().__init__(f"{loc}: {reason}", hint)


class SchemaError(BadInputError):
    """Data has the wrong shape (missing columns, wrong MIRAGE layout, bad schema version)."""


class OutputError(AnalysisError):
    """An output cannot be written (disk full, permission, path is a file)."""
