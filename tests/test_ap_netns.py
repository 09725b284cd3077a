"""The AP through the real pieces: dnsmasq, nft/iptables, sysctl, tcpdump in namespaces.

Three namespaces per test: ``ftap-*`` (the AP, a veth instead of a radio),
``ftcl-*`` (a phone) and ``ftnet-*`` (the internet). Nothing outside them is touched.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ap_setup.capture import Capture, iter_frames, qa_capture
from ap_setup.config import ApConfig, CaptureConfig
from ap_setup.lifecycle import ap_down, ap_status, ap_up
from ap_setup.runner import SubprocessRunner
from ap_setup.state import ApState
from controller.errors import ApError

pytestmark = [pytest.mark.root, pytest.mark.slow]

NEEDED = ["ip", "nft", "dnsmasq", "tcpdump", "busybox", "sysctl", "ethtool"]


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    missing = [b for b in NEEDED if shutil.which(b) is None]
    if missing:
        return f"missing programs: {', '.join(missing)}"
    probe = f"ftprobe-{secrets.token_hex(3)}"
    if subprocess.run(["ip", "netns", "add", probe], capture_output=True).returncode != 0:
        return "cannot create network namespaces here"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


SKIP = _skip_reason()
if SKIP:
    pytestmark.append(pytest.mark.skip(reason=SKIP))

CLIENT_MAC = "02:00:5e:10:00:01"
LEASE_IP = "192.168.77.10"


def sh(*argv: str, check: bool = True, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    """Run a test helper command; failures show their stderr."""
    res = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} -> {res.returncode}: {res.stderr or res.stdout}")
    return res


def in_ns(ns: str, *argv: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return sh("ip", "netns", "exec", ns, *argv, **kw)  # type: ignore[arg-type]


@dataclass
class Lab:
    ap: str
    client: str
    net: str
    tmp: Path

    def config(self, **over: object) -> ApConfig:
        data: dict[str, object] = {
            "interface": "ftw0",
            "uplink": "ftu0",
            "netns": self.ap,
            "radio": False,
            "address": "192.168.77.1/24",
            "static_leases": [{"mac": CLIENT_MAC, "ip": LEASE_IP, "name": "pixel-7"}],
            "dns_hosts": [{"name": "lab.flowtruth.test", "ip": "10.77.0.2"}],
            "upstream_dns": ["10.77.0.2"],
            "state_dir": str(self.tmp / "state"),
            "nm_conf_dir": str(self.tmp / "nm"),
        }
        data.update(over)
        return ApConfig.model_validate(data)


def _kill_ns_pids(ns: str) -> None:
    res = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
    for pid in res.stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    """AP, client and internet namespaces joined by veth pairs; all removed afterwards."""
    tag = secrets.token_hex(3)
    lab = Lab(f"ftap-{tag}", f"ftcl-{tag}", f"ftnet-{tag}", tmp_path)
    created: list[str] = []
    try:
        for ns in (lab.ap, lab.client, lab.net):
            sh("ip", "netns", "add", ns)
            created.append(ns)
            in_ns(ns, "ip", "link", "set", "lo", "up")
        # Created directly inside the namespaces: the host's interfaces are never touched.
        sh(
            "ip",
            "-n",
            lab.ap,
            "link",
            "add",
            "ftw0",
            "type",
            "veth",
            "peer",
            "name",
            "ftc0",
            "netns",
            lab.client,
        )
        sh(
            "ip",
            "-n",
            lab.ap,
            "link",
            "add",
            "ftu0",
            "type",
            "veth",
            "peer",
            "name",
            "ftn0",
            "netns",
            lab.net,
        )
        in_ns(lab.client, "ip", "link", "set", "ftc0", "address", CLIENT_MAC)
        # A phone's Wi-Fi never hands over super-frames; make the client veth behave alike.
        in_ns(
            lab.client,
            "ethtool",
            "-K",
            "ftc0",
            "tso",
            "off",
            "gso",
            "off",
            "gro",
            "off",
            check=False,
        )
        in_ns(lab.client, "ip", "link", "set", "ftc0", "up")
        in_ns(lab.ap, "ip", "addr", "add", "10.77.0.1/24", "dev", "ftu0")
        in_ns(lab.ap, "ip", "link", "set", "ftu0", "up")
        in_ns(lab.ap, "ip", "route", "add", "default", "via", "10.77.0.2")
        in_ns(lab.net, "ip", "addr", "add", "10.77.0.2/24", "dev", "ftn0")
        in_ns(lab.net, "ip", "link", "set", "ftn0", "up")
        yield lab
    finally:
        for ns in created:
            _kill_ns_pids(ns)
        for ns in created:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


SYSCTLS = (
    r"^net\.ipv[46]\.(ip_forward|conf\..*\.(forwarding|disable_ipv6|accept_ra|accept_redirects))$"
)


def snapshot(lab: Lab) -> dict[str, str]:
    """Everything ``ap down`` must restore, as text dumps."""
    return {
        "nft": in_ns(lab.ap, "nft", "list", "ruleset").stdout,
        "iptables": "\n".join(
            ln
            for ln in in_ns(lab.ap, "iptables-save", check=False).stdout.splitlines()
            if not ln.startswith("#")
        ),
        "ip6tables": "\n".join(
            ln
            for ln in in_ns(lab.ap, "ip6tables-save", check=False).stdout.splitlines()
            if not ln.startswith("#")
        ),
        "sysctl": in_ns(lab.ap, "sysctl", "-a", "-r", SYSCTLS).stdout,
        "ethtool": in_ns(lab.ap, "ethtool", "-k", "ftw0").stdout,
        "addr": in_ns(lab.ap, "ip", "-br", "addr", "show", "dev", "ftw0").stdout,
        "addr6": in_ns(lab.ap, "ip", "-6", "addr", "show", "dev", "ftw0").stdout,
    }


def dhcp_client(lab: Lab) -> dict[str, str]:
    """busybox udhcpc in the client namespace; returns what the server handed out."""
    out = lab.tmp / "lease.env"
    script = lab.tmp / "udhcpc.sh"
    script.write_text(
        "#!/bin/sh\n"
        'case "$1" in bound|renew)\n'
        '  ip addr add "$ip/$subnet" dev "$interface"\n'
        '  [ -n "$router" ] && ip route add default via "$router" dev "$interface"\n'
        f'  printf "ip=%s\\nrouter=%s\\ndns=%s\\n" "$ip" "$router" "$dns" > {out}\n'
        ";; esac\n"
    )
    script.chmod(0o755)
    in_ns(lab.client, "busybox", "udhcpc", "-i", "ftc0", "-f", "-q", "-n", "-t", "5", "-T", "1",
          "-s", str(script), timeout=30)  # fmt: skip
    return dict(line.split("=", 1) for line in out.read_text().splitlines())


@pytest.fixture
def tcp_server(lab: Lab) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """A TCP server in the internet namespace: prints the peer address, sends N bytes."""
    nbytes = 3_500_000
    code = (
        "import socket,sys\n"
        "s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
        "s.bind(('10.77.0.2', 8080)); s.listen(1); print('ready', flush=True)\n"
        "c, a = s.accept(); print(a[0], flush=True)\n"
        f"c.sendall(b'x' * {nbytes}); c.close()\n"
    )
    proc = subprocess.Popen(
        ["ip", "netns", "exec", lab.net, sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield proc, nbytes
    finally:
        proc.kill()
        proc.wait()


def fetch(lab: Lab, nbytes: int) -> int:
    code = (
        "import socket\n"
        "c=socket.create_connection(('10.77.0.2', 8080), timeout=5); n=0\n"
        "while (d := c.recv(65536)): n += len(d)\n"
        "print(n)\n"
    )
    return int(in_ns(lab.client, sys.executable, "-c", code, timeout=30).stdout)


def test_ap_up_serves_dhcp_dns_and_nat_then_down_restores(lab: Lab, tcp_server) -> None:
    before = snapshot(lab)
    cfg = lab.config()
    events = []
    state = ap_up(cfg, sink=events.append)
    assert state.status == "up"
    assert [e.step for e in events][-1] == "up"
    assert json.loads(cfg.state_path.read_text())["sysctl_before"]["net.ipv4.ip_forward"] == "0"
    during = snapshot(lab)
    assert "table inet flowtruth" in during["nft"]
    assert "1" in in_ns(lab.ap, "sysctl", "-n", "net.ipv4.ip_forward").stdout
    assert "generic-receive-offload: off" in during["ethtool"]

    # DHCP: the static lease for the client's MAC, with the AP as router and DNS.
    lease = dhcp_client(lab)
    assert lease == {"ip": LEASE_IP, "router": "192.168.77.1", "dns": "192.168.77.1"}
    st = ap_status(cfg)
    assert st.up and st.daemons == {"dnsmasq": True}
    assert [(c.mac, c.ip, c.name) for c in st.clients] == [(CLIENT_MAC, LEASE_IP, "pixel-7")]

    # DNS: a configured name answers from dnsmasq on the AP address.
    assert dns_answers(lab)

    # NAT: the server sees the AP's uplink address, not the phone's.
    proc, nbytes = tcp_server
    assert fetch(lab, nbytes) == nbytes
    assert proc.stdout is not None and proc.stdout.readline().strip() == "10.77.0.1"

    assert ap_down(cfg.state_path) is not None
    assert not cfg.state_path.exists()
    assert snapshot(lab) == before
    assert ap_down(cfg.state_path) is None  # idempotent


def test_iptables_fallback_restores_exactly(lab: Lab, tcp_server) -> None:
    if shutil.which("iptables") is None:
        pytest.skip("iptables not installed")
    before = snapshot(lab)
    cfg = lab.config(firewall="iptables")
    ap_up(cfg)
    assert "FT-POSTROUTING" in in_ns(lab.ap, "iptables-save").stdout
    dhcp_client(lab)
    proc, nbytes = tcp_server
    assert fetch(lab, nbytes) == nbytes
    assert proc.stdout is not None and proc.stdout.readline().strip() == "10.77.0.1"
    ap_down(cfg.state_path)
    assert snapshot(lab) == before


def test_down_after_crash_restores_from_state_file(lab: Lab, monkeypatch) -> None:
    before = snapshot(lab)
    cfg = lab.config()
    import ap_setup.lifecycle as lifecycle

    # A crash in the middle of bring-up: the NAT step dies and no undo runs.
    real_run = SubprocessRunner.run

    def dying_run(self, argv, **kw):
        if list(argv[:2]) == ["nft", "-f"]:
            real_run(self, argv, **kw)
            raise KeyboardInterrupt
        return real_run(self, argv, **kw)

    monkeypatch.setattr(SubprocessRunner, "run", dying_run)
    monkeypatch.setattr(lifecycle, "ap_down", lambda *a, **k: None)
    with pytest.raises(KeyboardInterrupt):
        ap_up(cfg)
    monkeypatch.undo()
    assert ApState.load(cfg.state_path).status == "starting"
    assert snapshot(lab) != before
    with pytest.raises(ApError, match="already up"):
        ap_up(cfg)
    ap_down(cfg.state_path)
    assert snapshot(lab) == before

    # A crash while up: dnsmasq killed, the controller gone; down still restores.
    state = ap_up(cfg)
    os.kill(state.processes["dnsmasq"].pid, signal.SIGKILL)
    time.sleep(0.2)
    assert ap_status(cfg).daemons == {"dnsmasq": False}
    ap_down(cfg.state_path)
    assert snapshot(lab) == before


def test_failed_start_undoes_everything(lab: Lab) -> None:
    before = snapshot(lab)
    # Another DNS server already holds port 53 on the AP address: dnsmasq cannot start.
    in_ns(lab.ap, "ip", "addr", "add", "192.168.77.1/24", "dev", "ftw0")
    blocker = subprocess.Popen(
        ["ip", "netns", "exec", lab.ap, sys.executable, "-c",
         "import socket,time; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM);"
         "s.bind(('192.168.77.1', 53)); print('ok', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert blocker.stdout is not None and blocker.stdout.readline().strip() == "ok"
        before = snapshot(lab)
        with pytest.raises(ApError, match="dnsmasq exited"):
            ap_up(lab.config())
        assert snapshot(lab) == before
        assert not lab.config().state_path.exists()
    finally:
        blocker.kill()
        blocker.wait()


def test_capture_rotation_holds_every_packet(lab: Lab, tcp_server) -> None:
    cfg = lab.config(capture={"ring_file_mb": 1, "snaplen": 0})
    out = lab.tmp / "run"
    ap_up(cfg, capture_dir=out)
    dhcp_client(lab)
    proc, nbytes = tcp_server
    assert fetch(lab, nbytes) == nbytes
    time.sleep(0.3)
    ap_down(cfg.state_path)
    stats = json.loads((out / "capture-stats.json").read_text())
    files = Capture(cfg.capture, "ftw0", out, SubprocessRunner()).files()
    assert len(files) >= 3, files
    assert stats["packets_dropped_by_kernel"] == 0
    import dpkt

    ranges: list[tuple[int, int]] = []
    base: int | None = None
    count = 0
    for path in files:
        for _lt, _ts, buf in iter_frames(path):
            count += 1
            eth = dpkt.ethernet.Ethernet(buf)
            if isinstance(eth.data, dpkt.ip.IP) and isinstance(eth.data.data, dpkt.tcp.TCP):
                tcp = eth.data.data
                if tcp.sport == 8080 and tcp.data:
                    base = tcp.seq if base is None else base
                    rel = (tcp.seq - base) % 2**32  # relative, so a wrapping ISN is harmless
                    ranges.append((rel, rel + len(tcp.data)))
    assert count == stats["packets_captured"]
    # Every downstream byte is somewhere in the rotated files (retransmissions counted once).
    covered, end = 0, None
    for lo, hi in sorted(ranges):
        lo = lo if end is None else max(lo, end)
        if hi > lo:
            covered += hi - lo
        end = hi if end is None else max(end, hi)
    assert covered == nbytes
    qa = qa_capture(files, mtu=1500, stats=stats)
    assert qa.ok, qa.problems
    assert qa.packets == count and qa.max_ip_length <= 1500

    # The analysis core joins the rotated files back into one flow set: the download is
    # one bi-flow (not one per file) holding every byte.
    from analysis.assemble import read_flows

    table = read_flows(files)
    f = table.flows
    hits = [
        i
        for i in range(len(table))
        if f["proto"][i] == 6 and 8080 in (f["src_port"][i], f["dst_port"][i])
    ]
    assert len(hits) == 1
    assert int(f["bf_payload_bytes"][hits[0]]) >= nbytes


def test_capture_filter_and_time_rotation(lab: Lab, tcp_server) -> None:
    """A per-device filter keeps only the phone's packets; -G rotates by time."""
    cfg = lab.config()
    ap_up(cfg)
    dhcp_client(lab)
    settings = CaptureConfig(macs=[CLIENT_MAC], rotate_seconds=1, snaplen=96)
    cap = Capture(settings, "ftw0", lab.tmp / "cap", SubprocessRunner(lab.ap))
    try:
        cap.start()
        # Traffic from another MAC on the AP link, which the filter must drop.
        in_ns(
            lab.ap,
            "busybox",
            "ping",
            "-c",
            "2",
            "-W",
            "1",
            "-I",
            "ftw0",
            "192.168.77.250",
            check=False,
        )
        proc, nbytes = tcp_server
        assert fetch(lab, nbytes) == nbytes
        time.sleep(2.2)
        in_ns(lab.client, "busybox", "ping", "-c", "1", "192.168.77.1")
    finally:
        stats = cap.stop()
        ap_down(cfg.state_path)
    files = cap.files()
    assert len(files) >= 2
    assert stats["packets_captured"] > 0
    macs = set()
    n = 0
    for path in files:
        for _lt, _ts, buf in iter_frames(path):
            n += 1
            assert len(buf) <= 96
            macs.add((buf[0:6].hex(":"), buf[6:12].hex(":")))
    assert n == stats["packets_captured"]
    assert all(CLIENT_MAC in pair for pair in macs)


def table_rows(text: str) -> dict[str, list[str]]:
    """The rows of the rich tables in a CLI output, by first cell."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("│"):
            cells = [c.strip() for c in line.split("│")[1:-1]]
            rows[cells[0]] = cells
    return rows


def test_cli_up_status_down_across_processes(lab: Lab) -> None:
    """`flowtruth ap up` exits while dnsmasq, tcpdump and the supervisor keep running;
    the supervisor restarts a killed dnsmasq, `ap status` shows it, `ap down` ends them all."""
    import yaml

    from ap_setup.supervise import pid_alive

    before = snapshot(lab)
    cfg = lab.config(supervision={**FAST, "max_restarts": 5})
    conf = lab.tmp / "ap.yaml"
    conf.write_text(yaml.safe_dump(json.loads(cfg.model_dump_json())))
    repo = Path(__file__).resolve().parents[1]
    exe = repo / ".venv" / "bin" / "flowtruth"
    base = [str(exe)] if exe.exists() else [sys.executable, "-m", "controller.cli"]
    env = dict(os.environ, COLUMNS="250")

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*base, "ap", *args, "--config", str(conf)], capture_output=True,
                              text=True, timeout=60, cwd=repo, env=env)  # fmt: skip

    out = lab.tmp / "run"
    up = cli("up", "--capture", str(out))
    assert up.returncode == 0, up.stderr
    assert "AP up on ftw0" in up.stdout and "supervisor: process, pid" in up.stderr
    sup = ApState.load(cfg.state_path).supervisor
    assert sup is not None and sup.kind == "process" and pid_alive(sup.pid, sup.starttime)
    try:
        dhcp_client(lab)
        status = cli("status")
        assert status.returncode == 0
        assert f"supervisor: running (process, pid {sup.pid}" in status.stdout
        rows = table_rows(status.stdout)
        assert rows["dnsmasq"][2:4] == ["yes", "0"] and rows["capture"][2:4] == ["yes", "-"]
        assert "capture: running" in status.stdout
        assert (
            CLIENT_MAC in status.stdout and LEASE_IP in status.stdout and "pixel-7" in status.stdout
        )
        # The detached supervisor restarts a killed dnsmasq; status shows the restart.
        old = ApState.load(cfg.state_path).processes["dnsmasq"].pid
        os.kill(old, signal.SIGKILL)
        wait_for(lambda: ApState.load(cfg.state_path).health.get("dnsmasq") is not None
                 and ApState.load(cfg.state_path).processes["dnsmasq"].pid != old,
                 what="restart by the supervisor process")  # fmt: skip
        status = cli("status").stdout
        row = table_rows(status)["dnsmasq"]
        # started by `ap up`, not by the supervisor: its exit status is not known
        assert row[2:4] == ["yes", "1"] and "no longer running" in row[4], status
        assert "restarted as pid" in (cfg.work_dir / "supervisor.log").read_text()
    finally:
        down = cli("down")
    assert down.returncode == 0, down.stderr
    assert "is down" in down.stdout and "supervisor: stopped" in down.stderr
    assert not pid_alive(sup.pid, sup.starttime)
    assert snapshot(lab) == before
    assert json.loads((out / "capture-stats.json").read_text())["packets_captured"] > 0
    assert sh("ip", "netns", "pids", lab.ap).stdout.split() == []  # dnsmasq and tcpdump are gone
    assert cli("down").stdout.strip() == "nothing was up"
    qa = subprocess.run(
        [*base, "ap", "qa", str(out)], capture_output=True, text=True, timeout=60, cwd=repo
    )
    assert qa.returncode == 0, qa.stdout + qa.stderr
    assert "packets" in qa.stdout and "problem" not in qa.stdout


@pytest.mark.skipif(shutil.which("dumpcap") is None, reason="dumpcap not installed")
def test_dumpcap_capture_with_ring(lab: Lab, tcp_server) -> None:
    cfg = lab.config()
    ap_up(cfg)
    dhcp_client(lab)
    settings = CaptureConfig(tool="dumpcap", ring_file_mb=1, ring_files=20)
    cap = Capture(settings, "ftw0", lab.tmp / "dc", SubprocessRunner(lab.ap))
    try:
        cap.start()
        proc, nbytes = tcp_server
        assert fetch(lab, nbytes) == nbytes
        time.sleep(0.5)
    finally:
        stats = cap.stop()
        ap_down(cfg.state_path)
    files = cap.files()
    assert len(files) >= 3
    n = sum(1 for path in files for _ in iter_frames(path))
    assert n == stats["packets_captured"] > 2000
    assert qa_capture(files, stats=stats).oversize_frames == 0


FAST = {"check_interval": 0.1, "backoff_initial": 0.1, "backoff_max": 0.5, "max_restarts": 2,
        "restart_window": 60, "settle": 0.3}  # fmt: skip


def wait_for(cond, timeout: float = 5.0, what: str = "condition") -> float:
    """Poll ``cond`` until true; the seconds it took."""
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)
    return time.monotonic() - start


def dns_answers(lab: Lab) -> bool:
    # A records only: the AAAA question would go upstream, where nothing answers.
    ans = in_ns(lab.client, "busybox", "nslookup", "-type=a", "lab.flowtruth.test",
                "192.168.77.1", check=False, timeout=10)  # fmt: skip
    return ans.returncode == 0 and "10.77.0.2" in ans.stdout.split("lab.flowtruth.test", 1)[-1]


def test_supervisor_restarts_a_killed_dnsmasq_which_serves_again(lab: Lab) -> None:
    from ap_setup.supervise import DaemonRestarted

    before = snapshot(lab)
    cfg = lab.config(supervision=FAST)
    events: list[object] = []
    state = ap_up(cfg, supervise="thread", supervisor_sink=events.append)
    assert state.supervisor is not None and state.supervisor.kind == "thread"
    assert dhcp_client(lab)["ip"] == LEASE_IP and dns_answers(lab)

    old = state.processes["dnsmasq"].pid
    os.kill(old, signal.SIGKILL)
    took = wait_for(lambda: any(isinstance(e, DaemonRestarted) for e in events), what="restart")
    assert took < 3
    st = ap_status(cfg)
    assert st.daemons == {"dnsmasq": True} and st.supervisor_alive
    assert st.state.processes["dnsmasq"].pid != old
    assert st.health["dnsmasq"].restarts == 1
    assert st.health["dnsmasq"].history[0].reason.startswith("killed by SIGKILL")

    # The new dnsmasq hands out the lease again and answers DNS.
    in_ns(lab.client, "ip", "addr", "flush", "dev", "ftc0")
    assert dhcp_client(lab) == {"ip": LEASE_IP, "router": "192.168.77.1", "dns": "192.168.77.1"}
    assert dns_answers(lab)

    ap_down(cfg.state_path)
    assert snapshot(lab) == before
    assert sh("ip", "netns", "pids", lab.ap).stdout.split() == []  # nothing was resurrected
    time.sleep(0.3)
    assert sh("ip", "netns", "pids", lab.ap).stdout.split() == []


def test_supervisor_gives_up_on_a_dnsmasq_that_cannot_start(lab: Lab) -> None:
    before = snapshot(lab)
    cfg = lab.config(supervision=FAST)
    state = ap_up(cfg, supervise="thread")
    try:
        # A broken config makes every restart exit at once.
        with open(cfg.work_dir / "dnsmasq.conf", "a") as fh:
            fh.write("no-such-option-at-all\n")
        os.kill(state.processes["dnsmasq"].pid, signal.SIGKILL)
        wait_for(lambda: (ap_status(cfg).health.get("dnsmasq") or None)
                 and ap_status(cfg).health["dnsmasq"].gave_up, what="give-up")  # fmt: skip
        st = ap_status(cfg)
        line = st.health["dnsmasq"].gave_up
        assert line.startswith("dnsmasq keeps exiting: gave up after 2 restart(s)")
        assert "bad option" in line or "no-such-option" in line, line
        assert st.health["dnsmasq"].restarts == 2 and st.daemons == {"dnsmasq": False}
        wait_for(lambda: not ap_status(cfg).supervisor_alive, what="supervisor to end")
    finally:
        ap_down(cfg.state_path)
    assert snapshot(lab) == before


def foreground(lab: Lab, cfg: ApConfig) -> subprocess.Popen[str]:
    """`flowtruth ap up --foreground` in the background; returns once it supervises."""
    import yaml

    conf = lab.tmp / "ap.yaml"
    conf.write_text(yaml.safe_dump(json.loads(cfg.model_dump_json())))
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "controller.cli", "ap", "up", "--foreground", "--config", str(conf)],
        cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_for(lambda: proc.poll() is not None or ((s := ApState.load(cfg.state_path))
                 is not None and s.supervisor is not None), timeout=30, what="ap up")  # fmt: skip
    except AssertionError:
        proc.kill()
        proc.communicate()
        raise
    assert proc.poll() is None, proc.communicate()
    return proc


def test_foreground_up_supervises_until_interrupted(lab: Lab) -> None:
    before = snapshot(lab)
    cfg = lab.config(supervision=FAST)
    proc = foreground(lab, cfg)
    try:
        state = ApState.load(cfg.state_path)
        assert state.supervisor.kind == "foreground" and state.supervisor.pid == proc.pid
        old = state.processes["dnsmasq"].pid
        os.kill(old, signal.SIGKILL)
        wait_for(lambda: ApState.load(cfg.state_path).processes["dnsmasq"].pid != old,
                 what="restart")  # fmt: skip
        assert dhcp_client(lab)["ip"] == LEASE_IP
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "supervisor: dnsmasq (pid" in err and "killed by SIGKILL" in err
    assert "AP on ftw0 is down" in out
    assert not cfg.state_path.exists()
    assert snapshot(lab) == before

    # A dnsmasq that cannot start again: one line, the AP taken down, exit status 1.
    proc = foreground(lab, cfg)
    try:
        with open(cfg.work_dir / "dnsmasq.conf", "a") as fh:
            fh.write("no-such-option-at-all\n")
        os.kill(ApState.load(cfg.state_path).processes["dnsmasq"].pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 1, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("flowtruth: error: dnsmasq keeps exiting: gave up after 2 restart(s)")
    assert "Traceback" not in err
    assert not cfg.state_path.exists()
    assert snapshot(lab) == before

    # The terminal closes (SIGHUP, nothing can be printed any more): still torn down.
    proc = foreground(lab, cfg)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    proc.stderr.close()
    proc.send_signal(signal.SIGHUP)
    try:
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not cfg.state_path.exists()
    assert snapshot(lab) == before


@pytest.mark.parametrize("firewall", ["nft", "iptables"])
def test_ipv6_router_advertisements_give_the_client_a_slaac_address(lab: Lab,
                                                                     firewall: str) -> None:
    # Forwarding switched on per interface before: the global switch must not lose it.
    in_ns(lab.ap, "sysctl", "-q", "-w", "net.ipv4.conf.ftu0.forwarding=1")
    in_ns(lab.ap, "sysctl", "-q", "-w", "net.ipv6.conf.ftu0.forwarding=1")
    # IPv6 off on the AP interface before: on while up, off again after.
    in_ns(lab.ap, "sysctl", "-q", "-w", "net.ipv6.conf.ftw0.disable_ipv6=1")
    in_ns(lab.client, "sysctl", "-q", "-w", "net.ipv6.conf.ftc0.accept_dad=0")
    in_ns(lab.client, "sysctl", "-q", "-w", "net.ipv6.conf.ftc0.accept_ra=1")
    before = snapshot(lab)
    cfg = lab.config(ipv6_ra=True, ipv6_address="fd77:7466:1::1/64", firewall=firewall)
    state = ap_up(cfg)
    try:
        if firewall == "iptables":  # routed IPv6 filtered like IPv4 (nft: the inet table)
            assert "FT-FORWARD" in in_ns(lab.ap, "ip6tables-save").stdout
        assert state.address6_added == "fd77:7466:1::1/64"
        assert in_ns(lab.ap, "sysctl", "-n", "net.ipv6.conf.all.forwarding").stdout.strip() == "1"
        assert in_ns(lab.ap, "sysctl", "-n", "net.ipv6.conf.ftu0.accept_ra").stdout.strip() == "2"
        assert state.sysctl_before["net.ipv6.conf.all.forwarding"] == "0"
        assert state.sysctl_before["net.ipv6.conf.ftu0.forwarding"] == "1"
        assert state.sysctl_before["net.ipv6.conf.ftw0.disable_ipv6"] == "1"

        def slaac() -> str:
            out = in_ns(lab.client, "ip", "-6", "-o", "addr", "show", "dev", "ftc0",
                        "scope", "global").stdout  # fmt: skip
            return out if "fd77:7466:1:" in out and "tentative" not in out else ""

        wait_for(slaac, timeout=10, what="a SLAAC address from the router advertisement")
        assert "dynamic" in slaac()  # autoconfigured, with the advertised lifetimes
        route = in_ns(lab.client, "ip", "-6", "route", "show", "default").stdout
        assert "proto ra" in route
        in_ns(lab.client, "busybox", "ping6", "-c", "1", "-W", "2", "fd77:7466:1::1")
        ans = in_ns(lab.client, "busybox", "nslookup", "-type=a", "lab.flowtruth.test",
                    "fd77:7466:1::1", timeout=10)  # fmt: skip
        assert "10.77.0.2" in ans.stdout.split("lab.flowtruth.test", 1)[-1]
        assert "enable-ra" in (cfg.work_dir / "dnsmasq.conf").read_text()
    finally:
        ap_down(cfg.state_path)
    assert snapshot(lab) == before


def test_ipv6_ra_without_an_address_is_one_clear_error(lab: Lab) -> None:
    before = snapshot(lab)
    with pytest.raises(ApError, match="ftw0 has no global IPv6 address") as info:
        ap_up(lab.config(ipv6_ra=True))
    assert "ipv6_address" in info.value.one_line()
    assert snapshot(lab) == before


def ns_pids(ns: str, needle: str) -> list[int]:
    """Pids in namespace ``ns`` whose command line contains ``needle``."""
    out = []
    for pid in sh("ip", "netns", "pids", ns).stdout.split():
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if needle in cmd:
            out.append(int(pid))
    return out


def test_ap_up_killed_while_dnsmasq_starts_leaves_nothing_behind(lab: Lab) -> None:
    """`kill -9` of `flowtruth ap up` after dnsmasq was spawned but before its pid reached
    the state file: `ap down` still finds and stops it (by its command line, recorded
    before the spawn) and the next `ap up` works; a leftover no state file knows of (an
    older `ap down` forgot it) is stopped by the next `ap up` and by `ap down`."""
    import yaml

    before = snapshot(lab)
    # dnsmasq must stay alive this long before `ap up` records it: a wide, sure window
    slow = lab.config(supervision={"settle": 8.0})
    conf = lab.tmp / "ap.yaml"
    conf.write_text(yaml.safe_dump(json.loads(slow.model_dump_json())))
    repo = Path(__file__).resolve().parents[1]
    base = [sys.executable, "-m", "controller.cli", "ap"]

    def cli(*args: str, config: Path = conf) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*base, *args, "--config", str(config)], capture_output=True,
                              text=True, timeout=60, cwd=repo)  # fmt: skip

    marker = f"--conf-file={slow.work_dir / 'dnsmasq.conf'}"
    up = subprocess.Popen([*base, "up", "--no-supervise", "--config", str(conf)], cwd=repo,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        wait_for(lambda: ns_pids(lab.ap, marker) or up.poll() is not None, timeout=30,
                 what="dnsmasq to be spawned")  # fmt: skip
        assert up.poll() is None, up.communicate()
        up.kill()  # SIGKILL: no undo, no finally
        up.wait()
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
        up.communicate()
    orphans = ns_pids(lab.ap, marker)
    assert len(orphans) == 1
    state = ApState.load(slow.state_path)
    assert state is not None and state.status == "starting"
    assert "dnsmasq" not in state.processes and "dnsmasq" in state.launched
    # The pid file the daemon wrote names it too.
    wait_for(lambda: (slow.work_dir / "dnsmasq.pid").exists(), what="dnsmasq's pid file")
    assert int((slow.work_dir / "dnsmasq.pid").read_text()) == orphans[0]

    assert ap_status(slow).leftovers == {"dnsmasq": orphans}
    status = cli("status")
    assert f"dnsmasq: leftover process(es) {orphans[0]} not recorded" in status.stdout

    down = cli("down")
    assert down.returncode == 0, down.stderr
    assert f"stopped a leftover dnsmasq (pid {orphans[0]})" in down.stderr
    assert ns_pids(lab.ap, marker) == []
    assert snapshot(lab) == before

    # The next `ap up` works (dnsmasq gets the DHCP/DNS ports), and serves.
    fast = lab.config(supervision={"settle": 0.3})
    conf_fast = lab.tmp / "ap-fast.yaml"
    conf_fast.write_text(yaml.safe_dump(json.loads(fast.model_dump_json())))
    assert fast.work_dir == slow.work_dir
    res = cli("up", "--no-supervise", config=conf_fast)
    assert res.returncode == 0, res.stderr
    assert dhcp_client(lab)["ip"] == LEASE_IP and dns_answers(lab)

    # A dnsmasq the state file does not know of (what `ap down` forgot before this fix).
    state = ApState.load(fast.state_path)
    forgotten = state.processes.pop("dnsmasq").pid
    state.launched = {}
    state.save(fast.state_path)
    assert cli("down", config=conf_fast).returncode == 0
    assert ns_pids(lab.ap, marker) == [forgotten]
    res = cli("down", config=conf_fast)  # no state file: still found by its command line
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "nothing was up; stopped 1 leftover daemon(s)"
    assert ns_pids(lab.ap, marker) == []

    # ... and `ap up` itself clears such a leftover before it starts its own.
    state = ap_up(fast)
    forgotten = state.processes.pop("dnsmasq").pid
    state.launched = {}
    state.save(fast.state_path)
    ap_down(fast.state_path)
    assert ns_pids(lab.ap, marker) == [forgotten]
    events = []
    state = ap_up(fast, sink=events.append)
    assert any(e.step == "dnsmasq" and f"leftover dnsmasq (pid {forgotten})" in e.detail
               for e in events)  # fmt: skip
    assert ns_pids(lab.ap, marker) == [state.processes["dnsmasq"].pid]
    in_ns(lab.client, "ip", "addr", "flush", "dev", "ftc0")
    assert dhcp_client(lab)["ip"] == LEASE_IP
    ap_down(fast.state_path)
    assert sh("ip", "netns", "pids", lab.ap).stdout.split() == []
    assert snapshot(lab) == before


HOST_SERVICE_PORT = 8786  # a Dask scheduler's default port


def connects(ns: str, host: str, port: int) -> bool:
    code = (f"import socket\ntry:\n socket.create_connection(({host!r}, {port}), timeout=1.5)"
            "\n print('yes')\nexcept OSError:\n print('no')\n")  # fmt: skip
    return in_ns(ns, sys.executable, "-c", code, timeout=15).stdout.strip() == "yes"


def hairpinned(lab: Lab) -> bool:
    """Does the AP route a phone's packet for another phone (192.168.77.50) back onto
    the AP link? It then resolves that phone's address there (a neighbour entry)."""
    other = "192.168.77.50"
    in_ns(lab.ap, "ip", "neigh", "flush", "to", other, check=False)
    in_ns(lab.client, "sysctl", "-q", "-w", "net.ipv4.conf.ftc0.accept_redirects=0")
    in_ns(lab.client, "ip", "route", "replace", f"{other}/32", "via", "192.168.77.1")
    in_ns(lab.client, "busybox", "ping", "-c", "1", "-W", "1", other, check=False)
    in_ns(lab.client, "ip", "route", "del", f"{other}/32", check=False)
    return bool(in_ns(lab.ap, "ip", "neigh", "show", "to", other).stdout.strip())


@pytest.mark.parametrize("firewall", ["nft", "iptables"])
def test_phones_reach_only_dhcp_dns_and_icmp_on_the_ap_host(
    lab: Lab, tcp_server, firewall: str
) -> None:
    """A service on the AP host's 0.0.0.0 is closed to phones, DHCP/DNS/ping and the way
    to the internet work, and dnsmasq does not answer DNS from the uplink side."""
    if firewall == "iptables" and shutil.which("iptables") is None:
        pytest.skip("iptables not installed")
    before = snapshot(lab)
    service = subprocess.Popen(
        ["ip", "netns", "exec", lab.ap, sys.executable, "-c",
         "import socket,time\ns=socket.socket(); s.setsockopt(socket.SOL_SOCKET, "
         f"socket.SO_REUSEADDR, 1); s.bind(('0.0.0.0', {HOST_SERVICE_PORT})); s.listen(8)\n"
         "print('ready', flush=True)\nwhile True: s.accept()[0].close()\n"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    # the uplink side knows the way to the phone subnet (as a LAN router might)
    in_ns(lab.net, "ip", "route", "add", "192.168.77.0/24", "via", "10.77.0.1")
    try:
        assert service.stdout is not None and service.stdout.readline().strip() == "ready"
        cfg = lab.config(firewall=firewall)
        ap_up(cfg)
        try:
            assert dhcp_client(lab) == {"ip": LEASE_IP, "router": "192.168.77.1",
                                        "dns": "192.168.77.1"}  # fmt: skip
            assert dns_answers(lab)
            in_ns(lab.client, "busybox", "ping", "-c", "1", "-W", "2", "192.168.77.1")
            proc, nbytes = tcp_server
            assert fetch(lab, nbytes) == nbytes  # forwarding to the internet unchanged
            # the host's service: not from the phone, at either of the host's addresses
            assert not connects(lab.client, "192.168.77.1", HOST_SERVICE_PORT)
            assert not connects(lab.client, "10.77.0.1", HOST_SERVICE_PORT)
            # the uplink side still reaches the host (not the AP's business) ...
            assert connects(lab.net, "10.77.0.1", HOST_SERVICE_PORT)
            # ... but not dnsmasq on the AP's address
            ans = in_ns(lab.net, "busybox", "nslookup", "-type=a", "lab.flowtruth.test",
                        "192.168.77.1", check=False, timeout=20)  # fmt: skip
            assert "10.77.0.2" not in ans.stdout.split("lab.flowtruth.test", 1)[-1]
            # ap_isolate: the host does not route one phone's packets to another phone
            assert not hairpinned(lab)
        finally:
            ap_down(cfg.state_path)
        assert snapshot(lab) == before
        # without the filter phones would reach it: the test sees what the filter does
        cfg = lab.config(firewall=firewall, protect_host=False, ap_isolate=False)
        ap_up(cfg)
        try:
            dhcp_client(lab)
            assert hairpinned(lab)
            assert connects(lab.client, "192.168.77.1", HOST_SERVICE_PORT)
            ans = in_ns(lab.net, "busybox", "nslookup", "-type=a", "lab.flowtruth.test",
                        "192.168.77.1", check=False, timeout=20)  # fmt: skip
            assert "10.77.0.2" in ans.stdout.split("lab.flowtruth.test", 1)[-1]
        finally:
            ap_down(cfg.state_path)
        # a port opened on purpose (host_ports)
        cfg = lab.config(firewall=firewall, host_ports=[f"tcp/{HOST_SERVICE_PORT}"])
        ap_up(cfg)
        try:
            assert connects(lab.client, "192.168.77.1", HOST_SERVICE_PORT)
        finally:
            ap_down(cfg.state_path)
        assert snapshot(lab) == before
    finally:
        service.kill()
        service.wait()
