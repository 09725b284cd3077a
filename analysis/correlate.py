"""The correlator: each bi-flow gets the app whose socket made it, or an honest "don't know".

Precision comes first: a flow is labelled ``exact`` only when every socket observation
that fits it names the same app; when several apps fit it is ``ambiguous`` (the
candidates are listed in ``BF_candidates``), never guessed.

Clock convention: flow times are the AP's clock, observation times the phone's, and
``ap_ts = phone_ts - clock_offset`` (the offset is positive when the phone runs ahead).
The offset the session measured is refined from the data: each TCP ``connect()`` whose
5-tuple matches a flow that starts with a SYN gives one difference ``connect - syn``;
their median is the refined offset and the spread of the residuals is reported.

Matching, per flow:

1. *exact tuple*: socket lifetimes (all observations of one socket and remote endpoint,
   from the first to the last, close included; a netstat socket from first to last
   snapshot; a CSV row over its range) with the flow's protocol and device-side port,
   a compatible remote endpoint, and a lifetime that overlaps the flow's span widened by
   ``tolerance`` seconds. When the clock was refined from enough pairs, a lifetime must
   also not end before the flow begins by more than the measured clock spread (the
   "tight" tolerance), and when several apps fit the whole span is tightened so; this
   separates a port reused by two apps (or by an untraced one) seconds apart.
2. *remote endpoint*: for flows without any tuple match, lifetimes whose device-side
   port is unknown but whose remote endpoint and time fit (a TCP lifetime that starts
   with a connect must also start within ``tolerance`` of the flow's SYN). Such a match
   is ``ambiguous`` when a socket of another app talked to the same endpoint within
   ``remote_doubt_window`` seconds of the flow (without a local port nothing tells
   them apart).
3. Unexplained flows to port 53 or 853 (DNS from the system resolver, not the app) get
   ``dns_resolver_label`` (type ``resolver``); so do such flows that only a uid-level
   source (netstat, PCAPdroid) explains, because Android's resolver gives its query
   sockets the asking app's uid (the uid's label is kept in ``BF_candidates``). The
   rest stay ``unknown``. With ``most_common_fallback``
   (MIRAGE's behaviour, off by default) they get the session's target app instead.

A socket known only by its uid (no uid -> package map entry) labels the flow
``uid:<n>`` with ``BF_labeling_type`` ``unlabelled``; when a package is also known for
the flow, the uid-only observation is ignored. A socket whose uid the phone's package
list (``uid_map``) names gets that package; when the package is not one of
``target_packages`` (an app running in the background during the session) the flow's
type is ``background`` and its source says how: ``uid-map+netstat`` (or
``uid-map+pcapdroid``). A process-level source (strace, frida) naming the same package
for the flow makes it ``exact`` again.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from analysis.errors import BadInputError
from analysis.traces.model import (
    INODE_SOCK,
    KIND_CODE,
    SOURCE_CODE,
    SOURCES,
    ObservationSet,
    SocketObservation,
)

LABELING_TYPES = ("exact", "ambiguous", "unlabelled", "most-common", "resolver", "background")
BACKGROUND = "background"  # a non-target app's flow named by the uid -> package map
UNKNOWN = "unknown"
DEFAULT_DNS_LABEL = "android:dns-resolver"
DNS_PORTS = (53, 853)  # DNS and DNS over TLS


@dataclass(slots=True)
class FlowKeys:
    """What the correlator needs of F bi-flows, as numpy columns (device side is ``src``).

    Times are epoch seconds in the AP's clock. ``has_syn``/``syn_ts`` say whether the
    flow's first packet was a TCP SYN and when (defaults: no SYN, ``first_ts``).
    """

    proto: np.ndarray
    src_ip: np.ndarray  # object array of str
    src_port: np.ndarray
    dst_ip: np.ndarray
    dst_port: np.ndarray
    first_ts: np.ndarray
    last_ts: np.ndarray
    has_syn: np.ndarray = None  # type: ignore[assignment]  # filled in by __post_init__
    syn_ts: np.ndarray = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.proto = np.asarray(self.proto, dtype=np.int64)
        n = len(self.proto)
        self.src_ip = np.asarray(self.src_ip, dtype=object)
        self.dst_ip = np.asarray(self.dst_ip, dtype=object)
        self.src_port = np.asarray(self.src_port, dtype=np.int64)
        self.dst_port = np.asarray(self.dst_port, dtype=np.int64)
        self.first_ts = np.asarray(self.first_ts, dtype=np.float64)
        self.last_ts = np.asarray(self.last_ts, dtype=np.float64)
        self.has_syn = (np.zeros(n, dtype=bool) if self.has_syn is None
                        else np.asarray(self.has_syn, dtype=bool))
        self.syn_ts = (self.first_ts.copy() if self.syn_ts is None
                       else np.asarray(self.syn_ts, dtype=np.float64))
        for name in ("src_ip", "src_port", "dst_ip", "dst_port", "first_ts", "last_ts",
                     "has_syn", "syn_ts"):
            if len(getattr(self, name)) != n:
                raise BadInputError(f"FlowKeys: column {name} has {len(getattr(self, name))} "
                                    f"rows, proto has {n}")

    def __len__(self) -> int:
        return int(len(self.proto))


def flowkeys_from_table(table: Any) -> FlowKeys:
    """The correlator's view of an :class:`analysis.flowtable.FlowTable` (``has_syn``: the
    flow's first packet is the device's SYN, so a ``connect()`` made it)."""
    from analysis.flowtable import ACK, SYN  # local: keeps this module importable on its own

    src, dst = table.ip_strings()
    fl = table.flows
    n = len(table)
    first_pkt = table.pkt_offsets[:-1]
    has_pkt = table.pkt_offsets[1:] > first_pkt
    flags = np.zeros(n, dtype=np.int64)
    up = np.zeros(n, dtype=bool)
    if n and table.n_packets:
        idx = np.minimum(first_pkt, table.n_packets - 1)
        flags = np.where(has_pkt, table.packets["pkt_tcp_flags"][idx], 0)
        up = has_pkt & (table.packets["pkt_dir"][idx] == 0)
    proto = fl["proto"].astype(np.int64)
    # The device opened the connection: its SYN (without ACK) is the flow's first packet.
    has_syn = (proto == 6) & up & ((flags & SYN) != 0) & ((flags & ACK) == 0)
    first = fl["first_ts_ns"].astype(np.float64) / 1e9
    return FlowKeys(
        proto=proto, src_ip=np.asarray(src, dtype=object), src_port=fl["src_port"],
        dst_ip=np.asarray(dst, dtype=object), dst_port=fl["dst_port"], first_ts=first,
        last_ts=fl["last_ts_ns"].astype(np.float64) / 1e9, has_syn=has_syn, syn_ts=first,
    )


@dataclass
class CorrelationResult:
    """Per-flow label columns (object arrays, MIRAGE names) and a quality report."""

    labels: dict[str, np.ndarray]  # BF_label, BF_sublabel, BF_labeling_type, BF_label_source, BF_candidates
    report: dict[str, Any] = field(default_factory=dict)
    clock_offset: float = 0.0

    def __len__(self) -> int:
        return int(len(self.labels["BF_label"]))

    def apply(self, table: Any) -> None:
        """Store the label columns on a FlowTable (same flow order)."""
        if len(table) != len(self):
            raise BadInputError(f"{len(self)} labels for a table of {len(table)} flows")
        table.labels.update(self.labels)


# ----------------------------------------------------------------------------- lifetimes

@dataclass(slots=True)
class _Lifetimes:
    proto: np.ndarray
    lport: np.ndarray
    lip: np.ndarray
    rip: np.ndarray
    rport: np.ndarray
    start: np.ndarray  # phone clock
    end: np.ndarray
    connect: np.ndarray  # first connect() time (inf when none)
    label: np.ndarray  # effective label code (package, "a|b" shared uid, or "uid:N")
    sub: np.ndarray
    ltype: np.ndarray
    source: np.ndarray
    n: int


def _lifetimes(obs: ObservationSet) -> tuple[_Lifetimes, list[str], np.ndarray, np.ndarray]:
    """Observations reduced to socket lifetimes; also the extended string table and the
    per-string flags (is a package label, names several packages)."""
    strings = list(obs.strings)
    index = {s: i for i, s in enumerate(strings)}
    proto = obs.proto.astype(np.int64)
    lport = obs.local_port.astype(np.int64)
    lip = obs.local_ip.astype(np.int64)
    rip = obs.remote_ip.astype(np.int64)
    rport = obs.remote_port.astype(np.int64)
    ts = obs.ts
    end = np.where(np.isnan(obs.end_ts), ts, obs.end_ts)
    label = obs.label.astype(np.int64)
    is_pkg_row = label >= 0
    uid_only = (label < 0) & (obs.uid >= 0)
    if uid_only.any():
        for u in np.unique(obs.uid[uid_only]):
            s = f"uid:{int(u)}"
            c = index.get(s)
            if c is None:
                c = index[s] = len(strings)
                strings.append(s)
            label[uid_only & (obs.uid == u)] = c
    sub = obs.sublabel.astype(np.int64)
    ltype = obs.labeling_type.astype(np.int64)
    source = obs.source.astype(np.int64)
    kind = obs.kind
    sock = obs.sock.astype(np.int64)
    keep = (label >= 0) & ~np.isnan(ts)
    n_all = len(ts)
    rows = np.nonzero(keep)[0]

    # A socket's local port (and address) is fixed once bound: spread it to all its rows.
    # A socket known by its kernel inode (strace's socket:[inode], when strace could not
    # decode it) also takes them, and its protocol, from the netstat rows of that inode.
    has_sock = sock[rows] >= 0
    sk = np.where(has_sock, sock[rows] * 8 + source[rows], -1 - rows)
    by_inode = sock[rows] >= INODE_SOCK
    spread = np.where(by_inode, (sock[rows] - INODE_SOCK) * 8 + SOURCE_CODE["netstat"], sk)
    pr = proto[rows]
    if len(rows):
        uniq, inv = np.unique(sk, return_inverse=True)
        s_uniq, s_inv = np.unique(spread, return_inverse=True)
        best = np.full(len(s_uniq), -1, dtype=np.int64)
        np.maximum.at(best, s_inv, lport[rows])
        lp = np.where(lport[rows] < 0, best[s_inv], lport[rows])
        best_ip = np.full(len(s_uniq), -1, dtype=np.int64)
        np.maximum.at(best_ip, s_inv, lip[rows])
        li = np.where(lip[rows] < 0, best_ip[s_inv], lip[rows])
        if by_inode.any():
            best_pr = np.zeros(len(s_uniq), dtype=np.int64)
            np.maximum.at(best_pr, s_inv, pr)
            pr = np.where(pr == 0, best_pr[s_inv], pr)
    else:
        lp = li = np.zeros(0, dtype=np.int64)
        inv = np.zeros(0, dtype=np.int64)

    cols = {
        "proto": pr, "lport": lp, "lip": li, "rip": rip[rows], "rport": rport[rows],
        "ts": ts[rows], "end": end[rows], "label": label[rows], "sub": sub[rows],
        "ltype": ltype[rows], "source": source[rows], "kind": kind[rows].astype(np.int64),
        "grp": inv,
    }
    # Unknown protocol (no -yy, socket opened before tracing): stands for TCP and UDP.
    unk = cols["proto"] == 0
    if unk.any():
        extra = {k: v[unk] for k, v in cols.items()}
        cols["proto"] = np.where(unk, 6, cols["proto"])
        extra["proto"] = np.full(int(unk.sum()), 17, dtype=np.int64)
        cols = {k: np.concatenate([cols[k], extra[k]]) for k in cols}
    # Generic CSV rows may be oriented either way round (nDPI's client is not always the
    # device): add each the other way too.
    csv = cols["source"] == SOURCE_CODE["csv"]
    if csv.any():
        sw = {k: v[csv] for k, v in cols.items()}
        sw["lport"], sw["rport"] = sw["rport"], sw["lport"]
        sw["lip"], sw["rip"] = sw["rip"], sw["lip"]
        sw["grp"] = sw["grp"] + (int(cols["grp"].max()) + 1 if len(cols["grp"]) else 0)
        cols = {k: np.concatenate([cols[k], sw[k]]) for k in cols}

    m = len(cols["ts"])
    if m == 0:
        z = np.zeros(0, dtype=np.int64)
        zf = np.zeros(0, dtype=np.float64)
        lt = _Lifetimes(z, z, z, z, z, zf, zf, zf, z, z, z, z, 0)
    else:
        order = np.lexsort((cols["ts"], cols["rport"], cols["rip"], cols["lport"], cols["proto"],
                            cols["grp"]))
        g = {k: v[order] for k, v in cols.items()}
        brk = np.ones(m, dtype=bool)
        brk[1:] = ((g["grp"][1:] != g["grp"][:-1]) | (g["proto"][1:] != g["proto"][:-1])
                   | (g["lport"][1:] != g["lport"][:-1]) | (g["rip"][1:] != g["rip"][:-1])
                   | (g["rport"][1:] != g["rport"][:-1]))
        starts = np.nonzero(brk)[0]
        conn_ts = np.where(g["kind"] == KIND_CODE["connect"], g["ts"], np.inf)
        lt = _Lifetimes(
            proto=g["proto"][starts], lport=g["lport"][starts],
            lip=np.maximum.reduceat(g["lip"], starts), rip=g["rip"][starts],
            rport=g["rport"][starts], start=np.minimum.reduceat(g["ts"], starts),
            end=np.maximum.reduceat(np.maximum(g["end"], g["ts"]), starts),
            connect=np.minimum.reduceat(conn_ts, starts),
            label=np.maximum.reduceat(g["label"], starts),
            sub=np.maximum.reduceat(g["sub"], starts),
            ltype=np.maximum.reduceat(g["ltype"], starts),
            source=np.minimum.reduceat(g["source"], starts), n=len(starts),
        )
    is_pkg = np.array([not s.startswith("uid:") for s in strings] + [False], dtype=bool)
    multi = np.array(["|" in s for s in strings] + [False], dtype=bool)
    del is_pkg_row, n_all
    return lt, strings, is_pkg, multi


# ----------------------------------------------------------------------------- matching

def _ip_codes(ips: np.ndarray, index: dict[str, int]) -> np.ndarray:
    """String codes of flow addresses (-2 for an address no observation names)."""
    from analysis.traces.model import norm_ip

    cache: dict[Any, int] = {}
    out = np.empty(len(ips), dtype=np.int64)
    for i, s in enumerate(ips):
        c = cache.get(s)
        if c is None:
            n = norm_ip(s) if isinstance(s, str) else None
            c = cache[s] = index.get(n, -2) if n is not None else -2
        out[i] = c
    return out


def _expand(keys_sorted: np.ndarray, fkeys: np.ndarray, flows: np.ndarray,
            max_pairs: int = 4_000_000) -> Iterable[tuple[np.ndarray, np.ndarray]]:
    """(flow, position-in-sorted-lifetimes) pairs of equal key, in bounded chunks."""
    lo = np.searchsorted(keys_sorted, fkeys[flows], "left")
    hi = np.searchsorted(keys_sorted, fkeys[flows], "right")
    lens = hi - lo
    sel = lens > 0
    flows, lo, lens = flows[sel], lo[sel], lens[sel]
    if not len(flows):
        return
    csum = np.cumsum(lens)
    start = 0
    while start < len(flows):
        base = csum[start - 1] if start else 0
        stop = int(np.searchsorted(csum, base + max_pairs, "right"))
        stop = max(stop, start + 1)
        fl, lo_c, ln = flows[start:stop], lo[start:stop], lens[start:stop]
        total = int(ln.sum())
        offs = np.repeat(np.cumsum(ln) - ln, ln)
        pos = np.repeat(lo_c, ln) + (np.arange(total) - offs)
        yield np.repeat(fl, ln), pos
        start = stop


@dataclass(slots=True)
class _Pairs:
    f: np.ndarray
    iv: np.ndarray

    @staticmethod
    def cat(parts: list[tuple[np.ndarray, np.ndarray]]) -> _Pairs:
        if not parts:
            z = np.zeros(0, dtype=np.int64)
            return _Pairs(z, z)
        return _Pairs(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))


def _resolve(f: np.ndarray, iv: np.ndarray, lt: _Lifetimes, n_flows: int, is_pkg: np.ndarray
             ) -> dict[str, np.ndarray]:
    """Per flow: number of distinct labels, the label when one, best source, sublabel."""
    lab = lt.label[iv]
    has_pkg = np.zeros(n_flows, dtype=bool)
    has_pkg[f[is_pkg[lab]]] = True
    keep = is_pkg[lab] | ~has_pkg[f]
    f, iv, lab = f[keep], iv[keep], lab[keep]
    ndist = np.zeros(n_flows, dtype=np.int64)
    label = np.full(n_flows, -1, dtype=np.int64)
    src = np.full(n_flows, -1, dtype=np.int64)
    sub = np.full(n_flows, -1, dtype=np.int64)
    ltype = np.full(n_flows, -1, dtype=np.int64)
    srcmask = np.zeros(n_flows, dtype=np.int64)
    if len(f):
        order = np.lexsort((lab, f))
        f, iv, lab = f[order], iv[order], lab[order]
        new_f = np.ones(len(f), dtype=bool)
        new_f[1:] = f[1:] != f[:-1]
        new_fl = new_f.copy()
        new_fl[1:] |= lab[1:] != lab[:-1]
        ndist = np.bincount(f[new_fl], minlength=n_flows)
        st = np.nonzero(new_f)[0]
        fl = f[st]
        label[fl] = lab[st]
        s_iv = lt.source[iv]
        src[fl] = np.minimum.reduceat(s_iv, st)
        sb = lt.sub[iv]
        smin, smax = np.minimum.reduceat(sb, st), np.maximum.reduceat(sb, st)
        sub[fl] = np.where(smin == smax, smin, -1)
        lty = lt.ltype[iv]
        tmin, tmax = np.minimum.reduceat(lty, st), np.maximum.reduceat(lty, st)
        ltype[fl] = np.where(tmin == tmax, tmin, -1)
        srcmask[fl] = np.bitwise_or.reduceat(np.left_shift(1, s_iv), st)
    return {"ndist": ndist, "label": label, "src": src, "sub": sub, "ltype": ltype,
            "srcmask": srcmask, "f": f, "lab": lab, "iv": iv}


def _candidates(res: dict[str, np.ndarray], flows: np.ndarray, strings: list[str]) -> dict[int, str]:
    out: dict[int, set[str]] = {}
    want = np.zeros(len(res["ndist"]), dtype=bool)
    want[flows] = True
    sel = want[res["f"]]
    for fi, lab in zip(res["f"][sel].tolist(), res["lab"][sel].tolist(), strict=True):
        out.setdefault(fi, set()).update(strings[lab].split("|"))
    return {k: "|".join(sorted(v)) for k, v in out.items()}


def _refine_clock(lt: _Lifetimes, fk: FlowKeys, fdst: np.ndarray, offset: float,
                  window: float, min_pairs: int) -> tuple[float, dict[str, Any]]:
    """Median ``connect - SYN`` over matched pairs; returns the offset and a report."""
    cands = np.nonzero(np.isfinite(lt.connect) & (lt.lport >= 0) & (lt.rip >= 0)
                       & (lt.proto == 6))[0]
    syn = np.nonzero(fk.has_syn & (fdst >= 0))[0]
    info: dict[str, Any] = {"given_offset": offset, "pairs": 0}
    if not len(cands) or not len(syn):
        info.update(refined=False, reason="no connect()/SYN pairs")
        return offset, info
    fkey = (((fdst[syn] * 65536 + fk.dst_port[syn]) * 65536 + fk.src_port[syn]) * 256
            + fk.proto[syn])
    order = np.lexsort((fk.syn_ts[syn], fkey))
    fkey_s, syn_s = fkey[order], fk.syn_ts[syn][order]
    ckey = ((lt.rip[cands] * 65536 + lt.rport[cands]) * 65536 + lt.lport[cands]) * 256 + 6
    lo = np.searchsorted(fkey_s, ckey, "left")
    hi = np.searchsorted(fkey_s, ckey, "right")
    target = lt.connect[cands] - offset
    diffs = []
    for i in np.nonzero(hi > lo)[0].tolist():
        a, b = int(lo[i]), int(hi[i])
        seg = syn_s[a:b]
        j = int(np.searchsorted(seg, target[i]))
        best = None
        for k in (j - 1, j):
            if 0 <= k < len(seg):
                d = target[i] - seg[k]
                if abs(d) <= window and (best is None or abs(d) < abs(best)):
                    best = d
        if best is not None:
            diffs.append(best + offset)
    info["pairs"] = len(diffs)
    if len(diffs) < min_pairs:
        info.update(refined=False, reason=f"only {len(diffs)} connect()/SYN pairs")
        return offset, info
    d = np.asarray(diffs)
    new = float(np.median(d))
    resid = np.abs(d - new)
    info.update(
        refined=True, offset=new, residual_median=float(np.median(resid)),
        residual_p95=float(np.percentile(resid, 95)), residual_max=float(resid.max()),
    )
    return new, info


def correlate(
    flows: FlowKeys,
    observations: ObservationSet | Iterable[SocketObservation],
    *,
    clock_offset: float = 0.0,
    refine_clock: bool = True,
    target_packages: Sequence[str] = (),
    most_common_fallback: bool = False,
    dns_resolver_label: str = DEFAULT_DNS_LABEL,
    uid_map: dict[int, Any] | None = None,
    tolerance: float = 1.0,
    refine_window: float = 30.0,
    remote_doubt_window: float = 1.0,
    min_clock_pairs: int = 3,
) -> CorrelationResult:
    """Label each flow from socket observations (see the module docstring for the rules).

    ``clock_offset`` is phone minus AP seconds, as the session measured it; ``tolerance``
    is how far apart (seconds) a socket event and a flow may be and still match.
    """
    obs = (observations if isinstance(observations, ObservationSet)
           else ObservationSet.from_observations(observations))
    if uid_map:
        need = (obs.label < 0) & (obs.uid >= 0)
        obs = obs.with_uid_map(uid_map)
        if target_packages:
            # Rows the package list named, of an app that is not a target: background.
            filled = need & (obs.label >= 0) & (obs.labeling_type < 0)
            if filled.any():
                tset = set(target_packages)
                other = np.array([not set(t.split("|")) <= tset for t in obs.strings] + [False],
                                 dtype=bool)
                mark = filled & other[obs.label]
                if mark.any():
                    lt_col = obs.labeling_type.copy()
                    lt_col[mark] = obs.code_of(BACKGROUND)
                    obs.labeling_type = lt_col
    n = len(flows)
    lt, strings, is_pkg, multi = _lifetimes(obs)
    index = {s: i for i, s in enumerate(strings)}
    fdst = _ip_codes(flows.dst_ip, index)
    fsrc = _ip_codes(flows.src_ip, index)

    clock = {"given_offset": clock_offset, "refined": False}
    offset = clock_offset
    if refine_clock:
        offset, clock = _refine_clock(lt, flows, fdst, clock_offset, refine_window,
                                      min_clock_pairs)
    tight = None
    if clock.get("refined"):
        tight = min(tolerance, max(0.05, 3.0 * clock["residual_p95"]))
    start = lt.start - offset
    end = lt.end - offset
    connect = lt.connect - offset

    all_flows = np.arange(n)
    first, last = flows.first_ts, flows.last_ts

    def fit_tuple(f: np.ndarray, iv: np.ndarray, tol: float, tol_end: float) -> np.ndarray:
        ok = (start[iv] - tol <= last[f]) & (end[iv] + tol_end >= first[f])
        ok &= (lt.rip[iv] < 0) | (lt.rip[iv] == fdst[f])
        ok &= (lt.rport[iv] < 0) | (lt.rport[iv] == flows.dst_port[f])
        ok &= (lt.lip[iv] < 0) | (lt.lip[iv] == fsrc[f])
        return ok

    # Stage 1: protocol + device-side port.
    a_sel = np.nonzero(lt.lport >= 0)[0]
    a_key = lt.proto[a_sel] * 65536 + lt.lport[a_sel]
    a_ord = np.argsort(a_key, kind="stable")
    a_iv, a_key = a_sel[a_ord], a_key[a_ord]
    f_key_a = flows.proto * 65536 + flows.src_port
    parts = []
    for f, pos in _expand(a_key, f_key_a, all_flows):
        iv = a_iv[pos]
        # With a refined clock, a socket closed (or last seen) before the flow began is
        # not its socket, even within the loose tolerance: another app took the port.
        ok = fit_tuple(f, iv, tolerance, tolerance if tight is None else tight)
        parts.append((f[ok], iv[ok]))
    pa = _Pairs.cat(parts)
    ra = _resolve(pa.f, pa.iv, lt, n, is_pkg)
    tightened = 0
    if tight is not None and tight < tolerance:
        amb = ra["ndist"] > 1
        if amb.any():
            sel = amb[pa.f]
            f2, iv2 = pa.f[sel], pa.iv[sel]
            ok = fit_tuple(f2, iv2, tight, tight)
            rt = _resolve(f2[ok], iv2[ok], lt, n, is_pkg)
            fixed = amb & (rt["ndist"] == 1)
            tightened = int(fixed.sum())
            for k in ("ndist", "label", "src", "sub", "ltype"):
                ra[k][fixed] = rt[k][fixed]

    # Stage 2: remote endpoint + time, for flows no tuple explains.
    b_sel = np.nonzero((lt.lport < 0) & (lt.rip >= 0) & (lt.rport >= 0))[0]
    b_key = (lt.rip[b_sel] * 65536 + lt.rport[b_sel]) * 256 + lt.proto[b_sel]
    b_ord = np.argsort(b_key, kind="stable")
    b_iv, b_key = b_sel[b_ord], b_key[b_ord]
    f_key_b = (fdst * 65536 + flows.dst_port) * 256 + flows.proto
    need_b = np.nonzero((ra["ndist"] == 0) & (fdst >= 0))[0]
    parts = []
    for f, pos in _expand(b_key, f_key_b, need_b):
        iv = b_iv[pos]
        ok = (start[iv] - tolerance <= last[f]) & (end[iv] + tolerance >= first[f])
        ok &= (lt.lip[iv] < 0) | (lt.lip[iv] == fsrc[f])
        syn_check = flows.has_syn[f] & np.isfinite(connect[iv])
        ok &= ~syn_check | (np.abs(connect[iv] - flows.syn_ts[f]) <= tolerance)
        parts.append((f[ok], iv[ok]))
    pb = _Pairs.cat(parts)
    rb = _resolve(pb.f, pb.iv, lt, n, is_pkg)
    # One connect() makes one TCP connection. When more SYN flows compete for a flow's
    # connect() lifetimes than there are such lifetimes, something untraced also talked
    # to that endpoint then, so none of the competing flows is certain.
    # A flow the tuple stage gave the lifetime's app (its SYN as near the connect) also
    # claims it: without a local port the lifetime may be that flow's socket.
    if len(pb.f):
        claimed = np.isfinite(connect[pb.iv]) & flows.has_syn[pb.f]
        if claimed.any():
            cf, civ = pb.f[claimed], pb.iv[claimed]
            per_iv = np.bincount(civ, minlength=lt.n)  # flows claiming each lifetime
            done = np.nonzero(flows.has_syn & (fdst >= 0) & (ra["ndist"] == 1))[0]
            for f, pos in _expand(b_key, f_key_b, done):
                iv = b_iv[pos]
                ok = np.isfinite(connect[iv]) & (lt.label[iv] == ra["label"][f])
                ok &= np.abs(connect[iv] - flows.syn_ts[f]) <= tolerance
                ok &= (lt.lip[iv] < 0) | (lt.lip[iv] == fsrc[f])
                per_iv += np.bincount(iv[ok], minlength=lt.n)
            per_f = np.bincount(cf, minlength=n)  # lifetimes each flow may be
            worst = np.zeros(n, dtype=np.int64)
            np.maximum.at(worst, cf, per_iv[civ])
            doubt = worst > per_f
            rb["ndist"][doubt & (rb["ndist"] == 1)] = 2
            remote_doubt = int(doubt.sum())
        else:
            remote_doubt = 0
    else:
        remote_doubt = 0
    # A flow matched by remote endpoint alone is certain only when no socket of another
    # app talked to that endpoint near it: an strace entry time can lead the SYN (or
    # packet) by more than the tolerance on a loaded phone, and without a local port
    # nothing else tells two apps' sockets to one server apart.
    near_other = 0
    one_b = need_b[rb["ndist"][need_b] == 1]
    if len(one_b):
        w = max(tolerance, remote_doubt_window)
        hit = np.zeros(n, dtype=bool)
        for f, pos in _expand(b_key, f_key_b, one_b):
            iv = b_iv[pos]
            ok = (start[iv] - w <= last[f]) & (end[iv] + w >= first[f])
            ok &= (lt.lip[iv] < 0) | (lt.lip[iv] == fsrc[f])
            ok &= lt.label[iv] != rb["label"][f]
            hit[f[ok]] = True
        rb["ndist"][hit & (rb["ndist"] == 1)] = 2
        near_other = int(hit.sum())

    # Assemble.
    out_label = np.full(n, UNKNOWN, dtype=object)
    out_sub = np.full(n, None, dtype=object)
    out_type = np.full(n, "unlabelled", dtype=object)
    out_src = np.full(n, None, dtype=object)
    out_cand = np.full(n, None, dtype=object)
    strs = np.array(strings + [None], dtype=object)
    srcs = np.array(list(SOURCES) + [None], dtype=object)

    def put(res: dict[str, np.ndarray], mask_stage: np.ndarray, stage: str) -> dict[str, int]:
        one = mask_stage & (res["ndist"] == 1)
        lab = res["label"]
        multi_one = one & multi[np.where(lab >= 0, lab, -1)]
        pkg_one = one & is_pkg[np.where(lab >= 0, lab, -1)] & ~multi_one
        uid_one = one & ~is_pkg[np.where(lab >= 0, lab, -1)]
        out_label[pkg_one | uid_one] = strs[lab[pkg_one | uid_one]]
        out_sub[pkg_one] = strs[res["sub"][pkg_one]]
        lty = res["ltype"]
        out_type[pkg_one] = np.where(lty[pkg_one] >= 0, strs[lty[pkg_one]], "exact")
        out_type[uid_one] = "unlabelled"
        out_src[one] = srcs[res["src"][one]]
        amb = (mask_stage & (res["ndist"] > 1)) | multi_one
        out_type[amb] = "ambiguous"
        out_src[amb] = srcs[res["src"][amb]]
        cands = _candidates(res, np.nonzero(amb)[0], strings)
        for fi, c in cands.items():
            out_cand[fi] = c
        return {f"{stage}_exact": int(pkg_one.sum()), f"{stage}_uid_only": int(uid_one.sum()),
                f"{stage}_ambiguous": int(amb.sum())}

    stage_counts = put(ra, np.ones(n, dtype=bool), "tuple")
    b_mask = np.zeros(n, dtype=bool)
    b_mask[need_b] = True
    stage_counts.update(put(rb, b_mask, "remote"))

    unl = out_type == "unlabelled"
    unexplained = unl & (out_src == None)  # noqa: E711 - elementwise on an object array
    to_dns = np.isin(flows.dst_port, DNS_PORTS) & ((flows.proto == 17) | (flows.proto == 6))
    # Android's resolver (netd) hands its query sockets to the asking app's uid, so a
    # uid-level source (netstat, PCAPdroid) names the app for the resolver's own queries.
    # Only process-level sources (strace, frida) can tell an app's own DNS from them.
    by_uid = np.isin(out_src, ("netstat", "pcapdroid")) & (out_type != "ambiguous")
    dns_uid = to_dns & by_uid
    out_cand[dns_uid] = out_label[dns_uid]
    dns = (unexplained & to_dns) | dns_uid
    out_label[dns] = dns_resolver_label
    out_type[dns] = "resolver"
    out_src[dns] = "port"
    fallback_label = None
    n_fallback = 0
    if most_common_fallback:
        if target_packages:
            fallback_label = target_packages[0]
        else:
            ex = out_label[out_type == "exact"]
            if len(ex):
                vals, cnt = np.unique(ex.astype(str), return_counts=True)
                fallback_label = str(vals[int(np.argmax(cnt))])
        if fallback_label is not None:
            fb = (out_type == "unlabelled") & (out_src == None)  # noqa: E711
            out_label[fb] = fallback_label
            out_type[fb] = "most-common"
            out_src[fb] = "fallback"
            n_fallback = int(fb.sum())

    # Quality report.
    per_source: dict[str, int] = {}
    labelled_per_source: dict[str, int] = {}
    exact = out_type == "exact"
    named = ~np.isin(out_type, ("ambiguous", "unlabelled", "resolver", "most-common"))
    for s in SOURCES:
        per_source[s] = int((exact & (out_src == s)).sum())
        labelled_per_source[s] = int((named & (out_src == s)).sum())
    both = ra["srcmask"] & ((1 << SOURCE_CODE["strace"]) | (1 << SOURCE_CODE["netstat"]))
    both_mask = both == ((1 << SOURCE_CODE["strace"]) | (1 << SOURCE_CODE["netstat"]))
    agree = int((both_mask & (ra["ndist"] == 1)).sum())
    targets = set(target_packages)
    report: dict[str, Any] = {
        "flows": n,
        "observations": len(obs),
        "observations_without_owner": int(((obs.label < 0) & (obs.uid < 0)).sum()),
        "lifetimes": lt.n,
        "exact": int(exact.sum()),
        "exact_per_source": per_source,
        "labelled_per_source": labelled_per_source,  # also CSV labels of another type
        "ambiguous": int((out_type == "ambiguous").sum()),
        "unlabelled": int((out_type == "unlabelled").sum()),
        "uid_only": int(stage_counts["tuple_uid_only"] + stage_counts["remote_uid_only"]),
        "resolver": int(dns.sum()),
        "most_common": n_fallback,
        "stages": stage_counts,
        "tightened": tightened,
        "remote_competing": remote_doubt,
        "remote_near_other_app": near_other,
        "strace_netstat": {"both": int(both_mask.sum()), "agree": agree,
                           "disagree": int(both_mask.sum()) - agree},
        "clock": {**clock, "offset_used": offset, "tolerance": tolerance,
                  "tight_tolerance": tight},
    }
    if targets:
        report["target_flows"] = int(sum(1 for x in out_label[exact] if x in targets))
    report["background"] = int((out_type == BACKGROUND).sum())
    # (A CSV row of type background, e.g. labels.csv applied again, keeps source csv.)
    bg = (out_type == BACKGROUND) & np.isin(out_src, ("netstat", "pcapdroid"))
    out_src[bg] = np.array(["uid-map+" + str(x) for x in out_src[bg].tolist()], dtype=object)
    labels = {"BF_label": out_label, "BF_sublabel": out_sub, "BF_labeling_type": out_type,
              "BF_label_source": out_src, "BF_candidates": out_cand}
    return CorrelationResult(labels=labels, report=report, clock_offset=offset)
