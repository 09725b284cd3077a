"""Packet capture on the AP interface (before NAT) and its quality check.

:class:`Capture` runs tcpdump (or dumpcap) with a ring buffer, stops it with SIGINT
and parses the drop counters for the run manifest; :func:`qa_capture` reads the
pcap files with dpkt and flags frames larger than the MTU (offload leakage) and drops.
"""

from __future__ import annotations

import os
import re
import signal
import struct
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ap_setup.config import CaptureConfig
from ap_setup.runner import Runner
from ap_setup.state import ProcessRecord
from ap_setup.supervise import is_alive, log_tail, start_daemon, stop_daemon
from controller.errors import CaptureError

_TCPDUMP_STAT = re.compile(
    r"^(\d+) packets? (captured|received by filter|dropped by kernel|dropped by interface)\s*$"
)
# tcpdump's report on SIGUSR1: "tcpdump: 5 packets captured, 5 packets received by filter, 0
# packets dropped by kernel" on one line
_TCPDUMP_INFO = re.compile(r"(\d+) packets? (captured|received by filter|dropped by kernel|"
                           r"dropped by interface)(?=,|\s*$)")
_DUMPCAP_CAPTURED = re.compile(r"^Packets captured:\s*(\d+)")
_DUMPCAP_IFACE = re.compile(r"^Packets received/dropped on interface '[^']*':\s*(\d+)/(\d+)")
_PCAP_MAGIC_US, _PCAP_MAGIC_NS = 0xA1B2C3D4, 0xA1B23C4D
_STAT_KEYS = {
    "captured": "packets_captured",
    "received by filter": "packets_received_by_filter",
    "dropped by kernel": "packets_dropped_by_kernel",
    "dropped by interface": "packets_dropped_by_interface",
}


def capture_filter(settings: CaptureConfig, extra: str | None = None) -> str | None:
    """A BPF expression keeping only the configured devices, and what ``extra`` (a BPF
    expression) keeps, when given (None: capture everything)."""
    parts = [f"ether host {mac}" for mac in settings.macs]
    parts += [f"host {ip}" for ip in settings.ips]
    devices = " or ".join(f"({p})" for p in parts) if parts else None
    if devices and extra:
        return f"({devices}) and ({extra})"
    return devices or extra or None


def capture_argv(
    settings: CaptureConfig,
    interface: str,
    out_dir: Path,
    basename: str = "capture",
    bpf: str | None = None,
) -> list[str]:
    """The capture program's argv (no shell; the filter is one argv element); ``bpf`` is
    a further BPF expression the packets must match."""
    bpf = capture_filter(settings, bpf)
    if settings.tool == "dumpcap":
        argv = ["dumpcap", "-i", interface, "-q", "-P", "-s", str(settings.snaplen or 262144)]
        argv += ["-B", str(settings.buffer_mb)]
        argv += ["-w", str(out_dir / f"{basename}.pcap")]
        if settings.ring_file_mb:
            argv += ["-b", f"filesize:{settings.ring_file_mb * 1000}"]
            if settings.ring_files:
                argv += ["-b", f"files:{settings.ring_files}"]
        if settings.rotate_seconds:
            argv += ["-b", f"duration:{settings.rotate_seconds}"]
        if bpf:
            argv += ["-f", bpf]
        return argv
    name = f"{basename}-%Y%m%d-%H%M%S.pcap" if settings.rotate_seconds else f"{basename}.pcap"
    argv = ["tcpdump", "-i", interface, "-n", "-U", "-Z", "root"]
    argv += ["-B", str(settings.buffer_mb * 1024), "-s", str(settings.snaplen)]
    argv += ["-w", str(out_dir / name)]
    if settings.immediate:
        argv.append("--immediate-mode")
    if settings.nano:
        argv.append("--time-stamp-precision=nano")
    if settings.ring_file_mb:
        argv += ["-C", str(settings.ring_file_mb)]
        if settings.ring_files:
            argv += ["-W", str(settings.ring_files)]
    if settings.rotate_seconds:
        argv += ["-G", str(settings.rotate_seconds)]
    if bpf:
        argv.append(bpf)
    return argv


def parse_capture_stats(text: str) -> dict[str, int]:
    """Counters from tcpdump's or dumpcap's exit report, or tcpdump's report on SIGUSR1
    (missing ones are left out; the last report wins)."""
    stats: dict[str, int] = {}
    for line in text.splitlines():
        line = line.strip()
        if m := _TCPDUMP_STAT.match(line):
            stats[_STAT_KEYS[m.group(2)]] = int(m.group(1))
        elif line.startswith("tcpdump: ") and "packets captured," in line:
            for m in _TCPDUMP_INFO.finditer(line):
                stats[_STAT_KEYS[m.group(2)]] = int(m.group(1))
        elif m := _DUMPCAP_CAPTURED.match(line):
            stats["packets_captured"] = int(m.group(1))
        elif m := _DUMPCAP_IFACE.match(line):
            stats["packets_received_by_filter"] = int(m.group(1))
            stats["packets_dropped_by_kernel"] = int(m.group(2))
    return stats


def _first_timestamp(path: Path) -> float:
    """Time of the first packet in a pcap file (inf when empty, unreadable or pcapng)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(24 + 16)
    except OSError:
        return float("inf")
    if len(head) < 40:
        return float("inf")
    for endian in ("<", ">"):
        (magic,) = struct.unpack(endian + "I", head[:4])
        if magic in (_PCAP_MAGIC_US, _PCAP_MAGIC_NS):
            sec, frac = struct.unpack(endian + "II", head[24:32])
            return sec + frac * (1e-9 if magic == _PCAP_MAGIC_NS else 1e-6)
    return float("inf")


def capture_files(out_dir: Path, basename: str = "capture") -> list[Path]:
    """The capture's files in time order (by first packet, then by name)."""

    def natural(p: Path) -> tuple[object, ...]:
        return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name))

    files = [p for p in Path(out_dir).glob(f"{basename}*.pcap*") if p.is_file()]
    return sorted(files, key=lambda p: (_first_timestamp(p), natural(p)))


@dataclass
class Capture:
    """One capture process on the AP interface, writing into ``out_dir``."""

    settings: CaptureConfig
    interface: str
    out_dir: Path
    runner: Runner
    basename: str = "capture"
    record: ProcessRecord | None = None
    stats: dict[str, int] = field(default_factory=dict)
    bpf: str | None = None
    """A further BPF expression (on top of the settings' device filter)."""

    @property
    def log(self) -> Path:
        """The capture program's output (its exit report holds the counters)."""
        return self.out_dir / f"{self.basename}.log"

    def argv(self) -> list[str]:
        """The command line this capture runs."""
        return capture_argv(self.settings, self.interface, self.out_dir, self.basename, self.bpf)

    @property
    def running(self) -> bool:
        """True while the capture program runs."""
        return self.record is not None and is_alive(self.record)

    def start(self) -> ProcessRecord:
        """Start capturing; waits until the program reports it is listening."""
        tool = self.settings.tool
        if self.runner.which(tool) is None:
            raise CaptureError(f"{tool} is not installed", hint=f"apt-get install {tool}")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.record = start_daemon(self.runner, "capture", self.argv(), self.log, settle=0.3)
        except Exception as err:
            raise CaptureError(f"capture on {self.interface} failed: {err}") from None
        wait_listening(self.record)
        return self.record

    def stop(self) -> dict[str, int]:
        """Stop with SIGINT so the last packets are flushed; return the drop counters."""
        if self.record is None:
            return self.stats
        self.stats = stop_capture(self.record)
        return self.stats

    def files(self) -> list[Path]:
        """The files written so far, in time order."""
        return capture_files(self.out_dir, self.basename)

    def live_stats(self, timeout: float = 2.0) -> dict[str, int]:
        """The counters so far of a running tcpdump, which reports them on SIGUSR1 and
        carries on (empty for dumpcap, or when no report came within ``timeout``)."""
        rec = self.record
        if rec is None or self.settings.tool != "tcpdump" or not is_alive(rec):
            return {}
        log = Path(rec.log)
        try:
            before = log.read_text(errors="replace").count("dropped by kernel")
            os.kill(rec.pid, signal.SIGUSR1)
        except OSError:
            return {}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = log.read_text(errors="replace")
            if text.count("dropped by kernel") > before:
                time.sleep(0.05)  # the report's last line may still be on its way
                return parse_capture_stats(log.read_text(errors="replace"))
            time.sleep(0.02)
        return {}


def wait_listening(rec: ProcessRecord, timeout: float = 5.0) -> None:
    """Block until tcpdump/dumpcap says it captures, so no early packet is missed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = Path(rec.log).read_text(errors="replace") if Path(rec.log).exists() else ""
        if "listening on" in text or "Capturing on" in text:
            return
        if not is_alive(rec):
            raise CaptureError(f"capture exited at start: {log_tail(Path(rec.log))}")
        time.sleep(0.05)
    raise CaptureError(f"capture did not start within {timeout:g} s: {log_tail(Path(rec.log))}")


def stop_capture(rec: ProcessRecord) -> dict[str, int]:
    """SIGINT a recorded capture process and parse its counters from its log."""
    stop_daemon(rec, sig=signal.SIGINT, timeout=10.0)
    try:
        text = Path(rec.log).read_text(errors="replace")
    except OSError:
        text = ""
    return parse_capture_stats(text)


# ---- quality check ----------------------------------------------------------------

_DLT_EN10MB, _DLT_RAW, _DLT_LINUX_SLL, _DLT_LINUX_SLL2 = 1, 101, 113, 276


def _ip_length(linktype: int, buf: bytes) -> int | None:
    """Length of the IP packet in a frame, from the IP header (works on truncated frames)."""
    if linktype == _DLT_EN10MB:
        off, etype = 14, int.from_bytes(buf[12:14], "big") if len(buf) >= 14 else 0
        while etype in (0x8100, 0x88A8) and len(buf) >= off + 4:
            etype = int.from_bytes(buf[off + 2 : off + 4], "big")
            off += 4
    elif linktype == _DLT_LINUX_SLL:
        off, etype = 16, int.from_bytes(buf[14:16], "big") if len(buf) >= 16 else 0
    elif linktype == _DLT_LINUX_SLL2:
        off, etype = 20, int.from_bytes(buf[0:2], "big") if len(buf) >= 2 else 0
    elif linktype in (_DLT_RAW, 12, 14):
        off = 0
        etype = {4: 0x0800, 6: 0x86DD}.get(buf[0] >> 4 if buf else 0, 0)
    else:
        return None
    if etype == 0x0800 and len(buf) >= off + 4:
        return int.from_bytes(buf[off + 2 : off + 4], "big")
    if etype == 0x86DD and len(buf) >= off + 6:
        return 40 + int.from_bytes(buf[off + 4 : off + 6], "big")
    return None


def iter_frames(path: Path) -> Iterator[tuple[int, float, bytes]]:
    """(linktype, timestamp, frame bytes) of every record in a pcap or pcapng file."""
    import dpkt

    with open(path, "rb") as fh:
        try:
            reader: dpkt.pcap.Reader | dpkt.pcapng.Reader = dpkt.pcap.Reader(fh)
        except ValueError:
            fh.seek(0)
            reader = dpkt.pcapng.Reader(fh)
        linktype = reader.datalink()
        for ts, buf in reader:
            yield linktype, float(ts), bytes(buf)


@dataclass
class CaptureQa:
    """Result of :func:`qa_capture`: counts plus one line per problem."""

    files: int = 0
    packets: int = 0
    oversize_frames: int = 0
    max_ip_length: int = 0
    drops: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when nothing was flagged."""
        return not self.problems

    def to_manifest(self) -> dict[str, object]:
        """Plain values for the run manifest."""
        return {
            "files": self.files,
            "packets": self.packets,
            "oversize_frames": self.oversize_frames,
            "max_ip_length": self.max_ip_length,
            "drops": self.drops,
            "problems": list(self.problems),
        }


def qa_capture(
    files: Sequence[Path], mtu: int = 1500, stats: dict[str, int] | None = None
) -> CaptureQa:
    """Flag IP packets longer than the MTU (GRO/TSO leaking into the capture) and drops."""
    qa = CaptureQa(files=len(files))
    for path in files:
        try:
            for linktype, _ts, buf in iter_frames(path):
                qa.packets += 1
                length = _ip_length(linktype, buf)
                if length is None:
                    continue
                qa.max_ip_length = max(qa.max_ip_length, length)
                if length > mtu:
                    qa.oversize_frames += 1
        except Exception as err:  # dpkt raises several types on damaged files
            qa.problems.append(f"{path}: unreadable after {qa.packets} packets: {err}")
    if qa.oversize_frames:
        qa.problems.append(
            f"{qa.oversize_frames} packets larger than the MTU {mtu} (up to {qa.max_ip_length} "
            "bytes): segmentation offload leaked into the capture; turn gro/lro/tso/gso off"
        )
    if stats:
        qa.drops = stats.get("packets_dropped_by_kernel", 0) + stats.get(
            "packets_dropped_by_interface", 0
        )
        if qa.drops:
            qa.problems.append(f"capture dropped {qa.drops} packets (kernel or interface)")
        unwritten = stats.get("packets_received_by_filter", 0) - stats.get("packets_captured", 0)
        if "packets_captured" in stats and unwritten > 0:
            qa.drops += unwritten
            qa.problems.append(
                f"{unwritten} packets reached the capture buffer but were not written "
                "before the capture stopped (use immediate mode)"
            )
    return qa
