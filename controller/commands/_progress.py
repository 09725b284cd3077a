"""The byte-progress bar the reading commands share (``flows``, ``campus ingest``)."""

from __future__ import annotations

from typing import Any


def byte_progress() -> Any:
    """A transient rich progress bar of bytes: bar, done/total, rate and time left."""
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    return Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                    TransferSpeedColumn(), TimeRemainingColumn(), transient=True)
