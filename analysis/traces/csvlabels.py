"""Labels from CSV files: our generic format, PCAPdroid's connections export, nDPI verdicts.

**Generic CSV** (header required, any column order, extra columns ignored)::

    proto,local_ip,local_port,remote_ip,remote_port,label[,sublabel][,start,end][,labeling_type]

``proto`` is ``tcp``/``udp`` or 6/17; ``local`` is the device side; ``start``/``end``
are epoch seconds (without them a row holds for the whole capture); ``labeling_type``
(e.g. ``ndpi``) is passed on to ``BF_labeling_type`` instead of ``exact``. The
correlator matches a CSV row in either orientation.

**PCAPdroid's connections export** (``ConnectionsAdapter.dumpConnectionsCsv`` in
PCAPdroid's source): a header line, then one row per connection. Columns are found by
their header names, so both layouts read:

* v1.6: ``IPProto, SrcIP, SrcPort, DstIp, DstPort, UID, App, Proto, Status, Info,
  BytesSent, BytesRcvd, PktsSent, PktsRcvd, FirstSeen, LastSeen`` (16 columns,
  ``FirstSeen``/``LastSeen`` epoch milliseconds);
* v1.7.4 and later: ``PackageName`` after ``App`` (17 columns) and, since v1.7.0,
  ``FirstSeen``/``LastSeen`` in ISO 8601 with the phone's offset
  (``2026-05-04T12:00:01.123+02:00``).

``IPProto`` is 6/17, ``Src`` is the device side, ``App`` the app's display name (kept as
``process``). ``PackageName``, when present, is the label; otherwise the package comes
from ``UID`` through a uid map (``pm list packages -U``). A header whose names are not
PCAPdroid's (a localised one) falls back to v1.6's positions.
"""

from __future__ import annotations

import csv
import datetime as _dt
import math
import os
from collections.abc import Iterator
from pathlib import Path

from analysis.errors import OutputError, ParseError, SchemaError
from analysis.traces.model import ParseStats, SocketObservation, norm_ip, split_process

GENERIC_COLUMNS = ("proto", "local_ip", "local_port", "remote_ip", "remote_port", "label")
PCAPDROID_COLUMNS = ("IPProto", "SrcIP", "SrcPort", "DstIP", "DstPort", "UID", "App", "Proto",
                     "Status", "Info", "BytesSent", "BytesRcvd", "PktsSent", "PktsRcvd",
                     "FirstSeen", "LastSeen")
"""v1.6's layout (also the positions used for a header of unknown names)."""
PCAPDROID_NEEDED = ("IPProto", "SrcIP", "SrcPort", "DstIP", "DstPort", "UID", "FirstSeen")
_PROTO = {"tcp": 6, "udp": 17, "6": 6, "17": 17}


def _open(path: str | os.PathLike[str]):
    try:
        return open(Path(path), newline="", encoding="utf-8", errors="replace")
    except OSError as e:
        raise ParseError(path, None, f"cannot read CSV: {e.strerror or e}") from None


def _port(text: str) -> int | None:
    t = text.strip()
    if not t:
        return None
    p = int(float(t))
    if not 0 <= p < 65536:
        raise ValueError("port out of range")
    return p or None


def _time(text: str | None) -> float | None:
    if text is None or not text.strip():
        return None
    v = float(text)
    if not math.isfinite(v):
        raise ValueError("time not finite")
    return v


def _pcapdroid_time(text: str) -> float | None:
    """Epoch seconds of a PCAPdroid time: epoch milliseconds (v1.6; seconds tolerated)
    or ISO 8601 with an offset (v1.7+; without one it is taken as UTC)."""
    t = text.strip()
    if not t:
        return None
    if "T" in t or (t.count("-") >= 2 and ":" in t):
        iso = t[:-1] + "+00:00" if t.endswith("Z") else t
        d = _dt.datetime.fromisoformat(iso)
        if d.tzinfo is None:
            d = d.replace(tzinfo=_dt.UTC)
        return d.timestamp()
    v = _time(t)
    if v is not None and v > 1e11:  # milliseconds
        v /= 1000.0
    return v


def is_pcapdroid_header(header: list[str]) -> bool:
    """Whether a CSV header is PCAPdroid's (by its column names)."""
    names = {h.strip().lower() for h in header}
    return all(c.lower() in names for c in PCAPDROID_NEEDED)


def iter_csv_labels(
    path: str | os.PathLike[str],
    stats: ParseStats | None = None,
    *,
    pcap: str | None = None,
) -> Iterator[SocketObservation]:
    """Observations from a generic label CSV; ``pcap`` keeps only rows of that capture
    (by its ``pcap`` column, compared by file name)."""
    st = stats if stats is not None else ParseStats()
    with _open(path) as fh:
        reader = csv.DictReader(fh)
        cols = reader.fieldnames or []
        missing = [c for c in GENERIC_COLUMNS if c not in cols]
        if missing:
            raise SchemaError(f"{path}: label CSV lacks column(s) {', '.join(missing)}",
                              f"the header must name {','.join(GENERIC_COLUMNS)}")
        want = Path(pcap).name if pcap else None
        if want is not None and "pcap" not in cols:
            raise SchemaError(f"{path}: no pcap column to select {want!r} by")
        for row in reader:
            st.lines += 1
            if want is not None and Path(row.get("pcap") or "").name != want:
                continue
            try:
                proto = _PROTO.get((row["proto"] or "").strip().lower())
                if proto is None:
                    st.skip("protocol not TCP/UDP")
                    continue
                label = (row["label"] or "").strip()
                if not label:
                    st.skip("no label")
                    continue
                start, end = _time(row.get("start")), _time(row.get("end"))
                lport, rport = _port(row["local_port"] or ""), _port(row["remote_port"] or "")
            except (ValueError, TypeError, AttributeError):
                st.skip("bad row")
                continue
            sub = (row.get("sublabel") or "").strip() or None
            ltype = (row.get("labeling_type") or "").strip() or None
            st.parsed += 1
            yield SocketObservation(
                -math.inf if start is None else start, "csv", proto,
                norm_ip(row["local_ip"]), lport, norm_ip(row["remote_ip"]), rport, "snapshot",
                label=label, sublabel=sub,
                end_ts=math.inf if end is None else end, labeling_type=ltype,
            )


def iter_pcapdroid_csv(
    path: str | os.PathLike[str], stats: ParseStats | None = None
) -> Iterator[SocketObservation]:
    """Observations from PCAPdroid's connections CSV (see the module docstring)."""
    st = stats if stats is not None else ParseStats()
    with _open(path) as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is not None and header and header[0].startswith("\ufeff"):
            header[0] = header[0][1:]
        if header is None or len(header) < len(PCAPDROID_COLUMNS):
            raise SchemaError(f"{path}: not a PCAPdroid connections CSV "
                              f"(needs {len(PCAPDROID_COLUMNS)} columns)")
        names = [h.strip().lower() for h in header]
        if is_pcapdroid_header(header):
            col = {n: i for i, n in reversed(list(enumerate(names)))}
        else:  # a localised header: v1.6's positions
            col = {c.lower(): i for i, c in enumerate(PCAPDROID_COLUMNS)}
        i_proto, i_sip, i_sport = col["ipproto"], col["srcip"], col["srcport"]
        i_dip, i_dport, i_uid = col["dstip"], col["dstport"], col["uid"]
        i_app, i_pkg = col.get("app"), col.get("packagename")
        i_first, i_last = col["firstseen"], col.get("lastseen")
        width = max(i for i in col.values())
        for lineno, row in enumerate(reader, start=2):
            st.lines += 1
            if not row:
                continue
            if len(row) <= width:
                st.skip("short row")
                continue
            try:
                proto = _PROTO.get(row[i_proto].strip().lower())
                if proto is None:
                    st.skip("protocol not TCP/UDP")
                    continue
                lport, rport = _port(row[i_sport]), _port(row[i_dport])
                u = row[i_uid].strip()
                uid = int(u) if u.lstrip("-").isdigit() else None
                first = _pcapdroid_time(row[i_first])
                last = _pcapdroid_time(row[i_last]) if i_last is not None else None
            except (ValueError, TypeError, OverflowError) as e:
                st.skip("bad row")
                if len(st.warnings) < 5:
                    st.warnings.append(f"{path}: line {lineno}: bad row ({e})")
                continue
            if first is None:
                st.skip("no time")
                continue
            pkg = (row[i_pkg].strip() if i_pkg is not None else "") or None
            st.parsed += 1
            yield SocketObservation(
                first, "pcapdroid", proto, norm_ip(row[i_sip]), lport, norm_ip(row[i_dip]),
                rport, "snapshot", uid=None if uid is None or uid < 0 else uid,
                process=(row[i_app].strip() or None) if i_app is not None else None,
                label=pkg, end_ts=last,
            )


def ndpi_flow_labels_to_csv(flow_labels_csv: str | os.PathLike[str],
                            out_csv: str | os.PathLike[str],
                            stats: ParseStats | None = None) -> int:
    """nDPI's per-flow verdicts (``flow_labels.csv``) as a generic label CSV; rows written.

    The label is the ``app_family`` column, ``labeling_type`` is ``ndpi`` (nDPI's
    opinion, not ground truth) and the ``pcap`` column names the capture.
    """
    st = stats if stats is not None else ParseStats()
    need = ("pcap", "l4", "src_ip", "src_port", "dst_ip", "dst_port", "app_family")
    n = 0
    with _open(flow_labels_csv) as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in need if c not in (reader.fieldnames or [])]
        if missing:
            raise SchemaError(f"{flow_labels_csv}: lacks column(s) {', '.join(missing)}")
        try:
            out = open(out_csv, "w", newline="", encoding="utf-8")  # noqa: SIM115
        except OSError as e:
            raise OutputError(f"cannot write {out_csv}: {e.strerror or e}") from None
        with out:
            w = csv.writer(out)
            w.writerow([*GENERIC_COLUMNS, "labeling_type", "pcap"])
            for row in reader:
                st.lines += 1
                proto = (row["l4"] or "").strip().lower()
                if proto not in ("tcp", "udp"):
                    st.skip("protocol not TCP/UDP")
                    continue
                st.parsed += 1
                w.writerow([proto, row["src_ip"], row["src_port"], row["dst_ip"],
                            row["dst_port"], row["app_family"], "ndpi", row["pcap"]])
                n += 1
    return n


__all__ = ["is_pcapdroid_header", "iter_csv_labels", "iter_pcapdroid_csv", "ndpi_flow_labels_to_csv", "split_process"]
