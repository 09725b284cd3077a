"""Sources of socket events: strace, netstat polls, frida events, CSV labels, uid maps.

Each parser is a lazy ``iter_*`` yielding :class:`~analysis.traces.model.SocketObservation`
records and counting damaged input in a :class:`~analysis.traces.model.ParseStats`.
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Iterable

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
    "collect_observations",
    "KINDS", "SOURCES", "ObservationSet", "ParseStats", "SocketObservation", "Syscall",
    "norm_ip", "split_process",
]


def collect_observations(
    *,
    strace: Iterable[str | os.PathLike[str]] = (),
    netstat: Iterable[str | os.PathLike[str]] = (),
    frida: Iterable[str | os.PathLike[str]] = (),
    csv: Iterable[str | os.PathLike[str]] = (),
    pcapdroid: Iterable[str | os.PathLike[str]] = (),
    csv_pcap: str | None = None,
    date: str | _dt.date | None = None,
    utc_offset: float = 0.0,
) -> tuple[ObservationSet, dict[str, ParseStats]]:
    """Every source of one run packed into one :class:`ObservationSet`, with what each
    kind of source skipped (``stats[kind].summary()`` is the line to show a user).

    strace logs name their process by the launcher's file name; ``csv_pcap`` keeps only
    the CSV rows of that capture.
    """
    from analysis.traces.csvlabels import iter_csv_labels, iter_pcapdroid_csv
    from analysis.traces.frida import iter_frida_events
    from analysis.traces.netstat import iter_netstat_observations
    from analysis.traces.strace import iter_socket_observations

    stats = {k: ParseStats() for k in ("strace", "netstat", "frida", "csv", "pcapdroid")}
    sets = []
    for p in strace:
        sets.append(ObservationSet.from_source(p, iter_socket_observations(
            p, date=date, utc_offset=utc_offset, stats=stats["strace"]), stats["strace"]))
    for p in netstat:
        sets.append(ObservationSet.from_source(
            p, iter_netstat_observations(p, stats["netstat"]), stats["netstat"]))
    for p in frida:
        sets.append(ObservationSet.from_source(p, iter_frida_events(p, stats["frida"]),
                                               stats["frida"]))
    for p in csv:
        sets.append(ObservationSet.from_source(
            p, iter_csv_labels(p, stats["csv"], pcap=csv_pcap), stats["csv"]))
    for p in pcapdroid:
        sets.append(ObservationSet.from_source(p, iter_pcapdroid_csv(p, stats["pcapdroid"]),
                                               stats["pcapdroid"]))
    return ObservationSet.concat(sets), stats
