"""Sources of socket events: strace, netstat polls, frida events, CSV labels, uid maps.

Each parser is a lazy ``iter_*`` yielding :class:`~analysis.traces.model.SocketObservation`
records and counting damaged input in a :class:`~analysis.traces.model.ParseStats`.
"""

from __future__ import annotations

from analysis.traces.model import (
    KINDS,
    SOURCES,
    ObservationSet,
    ParseStats,
    SocketObservation,
    Syscall,
    norm_ip,
    split_process,
)

__all__ = [
    "KINDS", "SOURCES", "ObservationSet", "ParseStats", "SocketObservation", "Syscall",
    "norm_ip", "split_process",
]
