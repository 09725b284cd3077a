"""Header-only capture on a campus monitoring host, rotated for ``flowtruth campus ingest``.

Recipe (a monitoring host on a SPAN/mirror port or tap of the Wi-Fi aggregation):

1. Capture L2-L4 headers only, into rotated files in one directory per monitoring
   point under a common root (each first-level directory is one *rotation sequence*:
   flows cut by rotation are joined within it, including across nested date/hour
   directories such as n2disk's)::

       tcpdump -i IFACE -n -p -s 128 -G 3600 -w DIR/campus-%Y%m%d-%H%M%S.pcap 'ip or ip6 or (vlan and (ip or ip6))'
       dumpcap -i IFACE -n -p -s 128 -b duration:3600 -P -w DIR/campus.pcap -f 'ip or ip6 ...'

   (``flowtruth campus capture-command IFACE --dir DIR`` prints these.) 128 bytes keep
   Ethernet + 802.1Q + an IPv6 header + a TCP header with every option; an IPv4 packet
   keeps up to ~70 bytes beyond its headers in the raw file, which the ingest never
   reads past the L4 header and never stores. n2disk writes standard pcap files and is
   read the same way: give it the same snap length and an hourly file rotation.
2. Keep the raw files on the monitoring host, readable by the capture account only,
   and delete them once ingested: the store holds anonymised flows, the raw files hold
   clear addresses.
3. Ingest with a key that never leaves the analysis hosts::

       flowtruth campus keygen /etc/flowtruth/campus.key
       flowtruth campus ingest DIR --store STORE --key /etc/flowtruth/campus.key --min-age 120 -j 4

   ``--min-age`` skips the file the capture is still writing; rerun it from cron after
   every rotation: files already ingested are skipped by checksum.

MAC addresses: the flow core reads past the link layer without keeping it, so no MAC
address reaches the store; the raw files still hold them (step 2).

Multi-machine ingest: start ``dask scheduler`` on one host and ``dask worker
tcp://SCHEDULER:8786 --nworkers N --nthreads 1`` on each worker host; the capture
directory, the store and the key file must be at the same paths on every host (an NFS
or similar shared mount), then ``flowtruth campus ingest DIR --store STORE --key KEY
--scheduler tcp://SCHEDULER:8786``. The client commits every file into the manifest, so
only it writes ``manifest.sqlite``.
"""

from __future__ import annotations

from pathlib import Path

from analysis.errors import BadInputError

DEFAULT_SNAPLEN = 128
DEFAULT_FILTER = "ip or ip6 or (vlan and (ip or ip6))"


def capture_argv(tool: str, iface: str, out_dir: str | Path, *, snaplen: int = DEFAULT_SNAPLEN,
                 rotate_seconds: int = 3600, bpf: str | None = DEFAULT_FILTER,
                 user: str | None = None, basename: str = "campus") -> list[str]:
    """The argv of a header-only, rotated capture with tcpdump or dumpcap."""
    if snaplen < 64:
        raise BadInputError(f"snap length {snaplen} cuts IP/TCP headers", "use at least 96")
    if rotate_seconds < 1:
        raise BadInputError("rotation must be at least one second")
    out_dir = Path(out_dir)
    if tool == "tcpdump":
        argv = ["tcpdump", "-i", iface, "-n", "-p", "-s", str(snaplen), "-G", str(rotate_seconds),
                "-w", str(out_dir / f"{basename}-%Y%m%d-%H%M%S.pcap")]
        if user:
            argv += ["-Z", user]
        if bpf:
            argv.append(bpf)
        return argv
    if tool == "dumpcap":
        argv = ["dumpcap", "-i", iface, "-n", "-p", "-q", "-s", str(snaplen), "-b",
                f"duration:{rotate_seconds}", "-P", "-w", str(out_dir / f"{basename}.pcap")]
        if bpf:
            argv += ["-f", bpf]
        return argv
    raise BadInputError(f"unknown capture tool {tool!r}", "choose tcpdump or dumpcap")
