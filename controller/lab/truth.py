"""The lab's ground truth: what every simulated-app socket was, and how well a labelling did.

The simulated apps (:mod:`controller.lab.apps`) append JSON lines to the lab's truth file,
an ``open`` and a ``close`` event per socket, with the 5-tuple from ``getsockname()`` /
``getpeername()``, the package, uid, pid, phone and host-clock times.  Here they become
:class:`TruthSocket` records; :func:`score` matches labelled flows (e.g. ``labels.csv``
from ``flowtruth label``) to them by 5-tuple (either direction) and time, and reports
per app:

- precision = flows labelled with the app whose truth socket belongs to it / flows
  labelled with the app (a labelled flow without a truth socket counts as wrong);
- recall = truth sockets of the app that matched a flow labelled with it / truth
  sockets of the app (in the scored time window).
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from controller.errors import ConfigError

TRUTH_CSV_COLUMNS = (
    "proto", "local_ip", "local_port", "remote_ip", "remote_port", "app", "time", "end",
    "phone", "uid", "pid", "host",
)  # fmt: skip


@dataclass(slots=True)
class TruthSocket:
    """One socket of one simulated app (times on the host clock; ``end`` None while open)."""

    proto: str
    local_ip: str
    local_port: int
    remote_ip: str
    remote_port: int
    app: str
    start: float
    end: float | None
    phone: str = ""
    uid: int = 0
    pid: int = 0
    host: str = ""
    role: str = ""

    def key(self) -> tuple[str, frozenset[tuple[str, int]]]:
        """Direction-agnostic flow key."""
        return flow_key(
            self.proto, self.local_ip, self.local_port, self.remote_ip, self.remote_port
        )


@dataclass(slots=True)
class LabelledFlow:
    """One flow and the app a labelling gave it."""

    proto: str
    local_ip: str
    local_port: int
    remote_ip: str
    remote_port: int
    label: str
    start: float
    end: float


@dataclass
class AppScore:
    """Precision and recall of one app's labels."""

    app: str
    labelled: int = 0
    correct: int = 0
    truth: int = 0
    recalled: int = 0

    @property
    def precision(self) -> float | None:
        return self.correct / self.labelled if self.labelled else None

    @property
    def recall(self) -> float | None:
        return self.recalled / self.truth if self.truth else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "app": self.app,
            "labelled": self.labelled,
            "correct": self.correct,
            "truth": self.truth,
            "recalled": self.recalled,
            "precision": self.precision,
            "recall": self.recall,
        }


def flow_key(
    proto: str, a_ip: str, a_port: int, b_ip: str, b_port: int
) -> tuple[str, frozenset[tuple[str, int]]]:
    """(proto, {endpoint, endpoint}): the same for both directions of a flow."""
    return proto.lower(), frozenset({(a_ip, int(a_port)), (b_ip, int(b_port))})


def iter_truth(path: str | os.PathLike[str]) -> Iterator[TruthSocket]:
    """Sockets from a truth file, in order of opening; damaged lines are skipped."""
    open_by_key: dict[tuple[Any, ...], TruthSocket] = {}
    done: list[TruthSocket] = []
    order: list[TruthSocket] = []
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the truth file: {exc.strerror}") from None
    for line in text.splitlines():
        try:
            rec = json.loads(line)
            key = (rec["proto"], rec["local_ip"], int(rec["local_port"]), rec["remote_ip"],
                   int(rec["remote_port"]), int(rec.get("pid", 0)))  # fmt: skip
            event, when = rec["event"], float(rec["time"])
        except (ValueError, KeyError, TypeError):
            continue
        if event == "open":
            sock = TruthSocket(
                proto=key[0], local_ip=key[1], local_port=key[2], remote_ip=key[3],
                remote_port=key[4], app=str(rec.get("app", "")), start=when, end=None,
                phone=str(rec.get("phone", "")), uid=int(rec.get("uid", 0)), pid=key[5],
                host=str(rec.get("host", "")), role=str(rec.get("role", "")),
            )  # fmt: skip
            open_by_key[key] = sock
            order.append(sock)
        elif event == "close":
            sock_or_none = open_by_key.pop(key, None)
            if sock_or_none is not None:
                sock_or_none.end = when
                done.append(sock_or_none)
    yield from order


def read_truth(path: str | os.PathLike[str]) -> list[TruthSocket]:
    """Every socket in a truth file."""
    return list(iter_truth(path))


def truth_csv_text(truth: Iterable[TruthSocket]) -> str:
    """``truth.csv``: proto, local ip/port, remote ip/port, app, time (open), end, ..."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(TRUTH_CSV_COLUMNS)
    for t in truth:
        w.writerow([t.proto, t.local_ip, t.local_port, t.remote_ip, t.remote_port, t.app,
                    f"{t.start:.6f}", "" if t.end is None else f"{t.end:.6f}", t.phone, t.uid,
                    t.pid, t.host])  # fmt: skip
    return buf.getvalue()


def write_truth_csv(truth: Iterable[TruthSocket], path: str | os.PathLike[str]) -> Path:
    """Write ``truth.csv``; returns its path."""
    out = Path(path)
    out.write_text(truth_csv_text(truth), encoding="utf-8")
    return out


def read_labels_csv(path: str | os.PathLike[str]) -> list[LabelledFlow]:
    """Labelled flows from a ``labels.csv`` written by ``flowtruth label``."""
    flows = []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                try:
                    flows.append(
                        LabelledFlow(
                            proto=row["proto"],
                            local_ip=row["local_ip"],
                            local_port=int(row["local_port"]),
                            remote_ip=row["remote_ip"],
                            remote_port=int(row["remote_port"]),
                            label=row["label"],
                            start=float(row["start"]),
                            end=float(row["end"]),
                        )  # fmt: skip
                    )
                except (KeyError, ValueError, TypeError):
                    continue
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read labels: {exc.strerror}") from None
    return flows


def match(
    flow: LabelledFlow, index: dict[Any, list[TruthSocket]], tolerance: float = 2.0
) -> TruthSocket | None:
    """The truth socket of a flow: same 5-tuple, lifetimes overlapping (within ``tolerance``)."""
    best: TruthSocket | None = None
    for sock in index.get(
        flow_key(flow.proto, flow.local_ip, flow.local_port, flow.remote_ip, flow.remote_port), []
    ):
        end = sock.end if sock.end is not None else float("inf")
        if flow.start <= end + tolerance and flow.end >= sock.start - tolerance:
            if best is None or abs(sock.start - flow.start) < abs(best.start - flow.start):
                best = sock
    return best


def score(
    flows: Iterable[LabelledFlow],
    truth: Iterable[TruthSocket],
    apps: Iterable[str] | None = None,
    window: tuple[float, float] | None = None,
    tolerance: float = 2.0,
    min_lifetime: float = 0.0,
) -> dict[str, AppScore]:
    """Precision and recall per app (``apps``: the traced apps; default every label seen).

    ``window`` keeps the truth sockets alive within (start, end); ``min_lifetime`` leaves
    sockets shorter than that out of the recall (a poller that samples the socket
    tables every 50 ms cannot see a DNS socket that lives 2 ms).
    """
    flows = list(flows)
    all_truth = list(truth)
    truth = [
        t for t in all_truth
        if window is None or (t.start <= window[1] and (t.end or t.start) >= window[0])
    ]  # fmt: skip
    index: dict[Any, list[TruthSocket]] = {}
    for t in all_truth:
        index.setdefault(t.key(), []).append(t)
    wanted = set(apps) if apps is not None else {f.label for f in flows}
    scores = {a: AppScore(a) for a in sorted(wanted)}
    recalled: set[int] = set()
    for f in flows:
        sock = match(f, index, tolerance)
        if f.label in scores:
            s = scores[f.label]
            s.labelled += 1
            if sock is not None and sock.app == f.label:
                s.correct += 1
        if sock is not None and sock.app == f.label:
            recalled.add(id(sock))
    for t in truth:
        if t.end is not None and t.end - t.start < min_lifetime:
            continue
        if t.app in scores:
            scores[t.app].truth += 1
            if id(t) in recalled:
                scores[t.app].recalled += 1
    return scores
