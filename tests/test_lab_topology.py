"""The virtual lab end to end: namespaces, ap_setup AP, DHCP, emulated adbd, simulated apps.

A real lab (two phones) is brought up once for the module against a private real adb
server; tests drive the phones through adbutils exactly as the session engine will, look
at the AP capture and the servers' side of NAT, and read the truth file.  The module's
teardown checks that nothing is left: namespaces, links, /etc/netns entries, processes.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.lab.topology import Lab, list_namespaces, skip_reason, stale_lab_ids

REASON = skip_reason() or (None if shutil.which("adb") else "the Debian adb package is missing")
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")

SIGNAL = "org.thoughtcrime.securesms"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.05):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


def lab_leftovers(lab_id: str, workdir: str) -> list[str]:
    """Everything of lab ``lab_id`` still on the machine."""
    left = [n for n in list_namespaces() if n.startswith(f"ftl-{lab_id}-")]
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    left += re.findall(rf"\bftl{lab_id}a\d+\b", links)
    left += [str(p) for p in Path("/etc/netns").glob(f"ftl-{lab_id}-*")]
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if workdir in cmd or f"ftl-{lab_id}-" in cmd:
            left.append(f"pid {pid}: {cmd[:120]}")
    return left


class AdbServer:
    """A private real adb server (own port and HOME), killed at teardown."""

    def __init__(self, home: Path) -> None:
        self.port = free_port()
        self.env = dict(os.environ, HOME=str(home), ANDROID_USER_HOME=str(home / ".android"),
                        TMPDIR=str(home))  # fmt: skip

    def adb(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["adb", "-P", str(self.port), *args], env=self.env,
                              capture_output=True, text=True, stdin=subprocess.DEVNULL,
                              timeout=timeout)  # fmt: skip


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="flowtruth-lab-test-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def server(workdir: Path) -> Iterator[AdbServer]:
    home = workdir / "home"
    home.mkdir()
    srv = AdbServer(home)
    assert srv.adb("start-server").returncode == 0
    try:
        yield srv
    finally:
        srv.adb("kill-server")
        wait_until(lambda: not port_open(srv.port), timeout=10)


@pytest.fixture(scope="module")
def lab(server: AdbServer, workdir: Path) -> Iterator[Lab]:
    started = time.monotonic()
    lab = Lab.up(phones=2, adb_port=server.port, workdir=workdir / "lab",
                 state_dir=workdir / "state", mgmt_base=200,
                 phone_options={1: {"interruption_rate": 0}, 2: {"interruption_rate": 0}})  # fmt: skip
    up_s = time.monotonic() - started
    print(f"\nlab up: {up_s:.2f} s")
    try:
        yield lab
    finally:
        started = time.monotonic()
        lab.down()
        print(f"\nlab down: {time.monotonic() - started:.2f} s")
        assert lab_leftovers(lab.lab_id, str(workdir / "lab")) == []
        assert not (workdir / "state" / "lab.json").exists()


@pytest.fixture(scope="module")
def devices(lab: Lab, server: AdbServer):  # type: ignore[no-untyped-def]
    import adbutils

    client = adbutils.AdbClient(host="127.0.0.1", port=server.port)
    return [client.device(p.serial) for p in lab.phones]


def test_adb_devices_lists_the_phones(lab: Lab, server: AdbServer) -> None:
    out = server.adb("devices").stdout
    for p in lab.phones:
        assert re.search(rf"^{re.escape(p.serial)}\s+device$", out, re.M), out
        assert p.serial.startswith("10.254.")


def test_identity_and_abi(devices) -> None:  # type: ignore[no-untyped-def]
    assert devices[0].shell("getprop ro.product.model").strip() == "SM-S936B"
    assert devices[1].shell("getprop ro.product.model").strip() == "24069PC21I"
    assert devices[0].shell("getprop ro.product.cpu.abi").strip() == "x86_64"


def test_phones_got_their_address_by_dhcp(lab: Lab, devices) -> None:  # type: ignore[no-untyped-def]
    for p, d in zip(lab.phones, devices, strict=True):
        out = d.shell("ip -4 addr show dev wlan0")
        assert f"inet {p.ip}/24" in out
        assert p.mac in d.shell("ip link show dev wlan0")
        assert "default via 192.168.77.1 dev wlan0" in d.shell("ip route")
    leases = (lab.workdir / "ap" / "dnsmasq.leases").read_text()
    for p in lab.phones:
        assert p.mac in leases and p.ip in leases


def test_shell_exit_codes_su_and_large_push_pull(devices, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    d = devices[0]
    r = d.shell2("echo out; echo err >&2; exit 7", v2=True)
    assert (r.returncode, r.stdout, r.stderr) == (7, "out\n", "err\n")
    assert "uid=0(root)" in d.shell("su -c id")
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    d.sync.push(str(src), "/data/local/tmp/big.bin")
    assert (
        d.shell("sha256sum /data/local/tmp/big.bin").split()[0]
        == hashlib.sha256(src.read_bytes()).hexdigest()
    )
    back = tmp_path / "back.bin"
    d.sync.pull("/data/local/tmp/big.bin", str(back))
    assert back.read_bytes() == src.read_bytes()


def test_dns_names_resolve_to_the_lab_backends(devices) -> None:  # type: ignore[no-untyped-def]
    out = devices[0].shell("cat /etc/resolv.conf; busybox nslookup chat.signal.org")
    assert "nameserver 192.168.77.1" in out
    assert "76.223.92.165" in out
    assert "157.240.0.53" in devices[1].shell("busybox nslookup g.whatsapp.net")


def test_background_apps_run_under_their_uids(lab: Lab, devices) -> None:  # type: ignore[no-untyped-def]
    d = devices[0]
    pid = wait_until(lambda: d.shell("pidof com.google.android.gms").strip(), timeout=10)
    assert d.shell(f"cat /proc/{pid}/status | grep Uid").split()[1] == "10141"
    # gms keeps a connection to mtalk.google.com:5228 (BC1BFA8E:146C), owned by its uid
    tcp = wait_until(lambda: "BC1BFA8E:146C" in d.shell("cat /proc/net/tcp") and d.shell(
        "cat /proc/net/tcp"), timeout=10)  # fmt: skip
    rows = [line.split() for line in tcp.splitlines() if "BC1BFA8E:146C" in line]
    assert any(r[7] == "10141" for r in rows), rows


def _tap(d, resource_id: str = "", desc: str = "", text: str = "") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + 10
    while True:
        xml = d.shell("uiautomator dump /dev/tty").split("UI hierchary dumped")[0]
        for node in ET.fromstring(xml).iter("node"):
            if (
                (not resource_id or node.get("resource-id") == resource_id)
                and (not desc or node.get("content-desc") == desc)
                and (not text or node.get("text") == text)
            ):
                x1, y1, x2, y2 = map(int, re.findall(r"\d+", node.get("bounds", "")))
                d.shell(f"input tap {(x1 + x2) // 2} {(y1 + y2) // 2}")
                return
        if time.monotonic() > deadline:
            raise AssertionError(f"no element {resource_id or desc or text} on screen: {xml[:300]}")
        time.sleep(0.2)


def test_signal_end_to_end(lab: Lab, devices, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import dpkt

    from controller.lab.truth import read_truth

    phone, d = lab.phones[0], devices[0]
    cap = lab.start_capture(tmp_path / "cap")
    try:
        out = d.shell(f"am start -W -n {SIGNAL}/.RoutingActivity")
        assert "Starting: Intent { cmp=org.thoughtcrime.securesms/.RoutingActivity }" in out
        pid = wait_until(
            lambda: (
                (p := d.shell(f"pidof {SIGNAL}").strip())
                and d.shell(f"cat /proc/{p}/status").find("Uid:\t10263") >= 0
                and p
            ),
            timeout=10,
        )
        assert d.shell(f"cat /proc/{pid}/cmdline").split("\0")[0] == SIGNAL
        assert d.shell(f"cat /proc/{pid}/comm").strip() == SIGNAL[-15:]
        assert int(d.shell(f"ls /proc/{pid}/task | wc -l")) >= 3  # multi-threaded
        # its chat connection to chat.signal.org:443 (A55CDF4C = 76.223.92.165, 01BB = 443)
        tcp = wait_until(lambda: (t := d.shell("cat /proc/net/tcp")) and "A55CDF4C:01BB" in t
                         and t, timeout=10)  # fmt: skip
        assert any(r.split()[7] == "10263" for r in tcp.splitlines() if "A55CDF4C:01BB" in r)
        # a message and a photo to phone 2's owner, then a call that phone 2 answers
        _tap(d, f"{SIGNAL}:id/conversation_list_item_name", text=lab.phones[1].owner)
        _tap(d, f"{SIGNAL}:id/embedded_text_editor")
        d.shell("input text hello")
        _tap(d, f"{SIGNAL}:id/send_button")
        _tap(d, f"{SIGNAL}:id/attach_button")
        _tap(d, f"{SIGNAL}:id/attachment_keyboard_item_image")
        _tap(d, f"{SIGNAL}:id/send")
        _tap(d, f"{SIGNAL}:id/menu_call_secure")
        _tap(devices[1], f"{SIGNAL}:id/call_screen_answer_call")
        time.sleep(2.5)
        assert "End call" in d.shell("uiautomator dump /dev/tty")
        _tap(d, desc="End call")
        time.sleep(0.5)
        # the servers see the phone NATed behind the AP's uplink
        ss = subprocess.run(["ip", "netns", "exec", lab.ns("inet"), "ss", "-tn"],
                            capture_output=True, text=True).stdout  # fmt: skip
        assert "100.64.0.2:" in ss and "76.223.92.165:443" in ss
    finally:
        stats = cap.stop()
    assert stats.get("packets_dropped_by_kernel", 0) == 0
    flows: dict[tuple[str, str, int, str, int], int] = {}
    times: dict[tuple[str, str, int, str, int], list[float]] = {}
    for pcap in cap.files():
        with open(pcap, "rb") as f:
            for ts, buf in dpkt.pcap.UniversalReader(f):
                ip = dpkt.ethernet.Ethernet(buf).data
                if not isinstance(ip, dpkt.ip.IP) or not isinstance(
                    ip.data, dpkt.tcp.TCP | dpkt.udp.UDP
                ):
                    continue
                proto = "tcp" if isinstance(ip.data, dpkt.tcp.TCP) else "udp"
                src, dst = socket.inet_ntoa(ip.src), socket.inet_ntoa(ip.dst)
                if src == phone.ip:
                    key = (proto, src, ip.data.sport, dst, ip.data.dport)
                    flows[key] = flows.get(key, 0) + 1
                    times.setdefault(key, []).append(float(ts))
    assert ("udp", phone.ip) in {(k[0], k[1]) for k in flows if k[3] == "192.168.77.1"}  # DNS
    assert not any(k[3].startswith("10.254.") for k in flows)  # adb stays off the air
    truth = [
        t for t in read_truth(lab.truth_path) if t.app == SIGNAL and t.phone == phone.config.serial
    ]
    roles = {t.role for t in truth}
    assert {"dns", "chat", "media", "call-audio"} <= roles, roles
    for t in truth:
        if t.start >= min(t.start for t in truth):
            key = (t.proto, t.local_ip, t.local_port, t.remote_ip, t.remote_port)
            assert key in flows, (key, sorted(flows)[:10])
    media = next(t for t in truth if t.role == "media")
    assert (
        flows[(media.proto, media.local_ip, media.local_port, media.remote_ip, media.remote_port)]
        > 30
    )
    call = next(t for t in truth if t.role == "call-audio")
    assert call.remote_port == 3478 and call.remote_ip == "3.121.83.105"
    ckey = ("udp", call.local_ip, call.local_port, call.remote_ip, call.remote_port)
    rate = (flows[ckey] - 1) / (times[ckey][-1] - times[ckey][0])
    gaps = sorted((b - a for a, b in zip(times[ckey], times[ckey][1:], strict=False)), reverse=True)
    assert flows[ckey] >= 40 and 40 <= rate <= 60, (flows[ckey], rate, gaps[:8], call)


def test_force_stop_ends_the_app_and_closes_its_truth(lab: Lab, devices) -> None:  # type: ignore[no-untyped-def]
    from controller.lab.truth import read_truth

    d = devices[0]
    d.shell(f"am start -W -n {SIGNAL}/.RoutingActivity")
    pid = wait_until(
        lambda: (p := d.shell(f"pidof {SIGNAL}").strip()) and Path(f"/proc/{p}").exists() and p,
        timeout=10,
    )
    d.shell(f"am force-stop {SIGNAL}")
    wait_until(lambda: not Path(f"/proc/{pid}").exists(), timeout=10)
    assert d.shell2(f"pidof {SIGNAL}", v2=True).returncode == 1
    mine = [t for t in read_truth(lab.truth_path) if t.pid == int(pid)]
    assert mine
    assert [t for t in mine if t.end is None] == []


def test_status_reports_phones_and_processes(lab: Lab) -> None:
    st = lab.status()
    assert all(st["namespaces"].values())
    assert all(st["processes"].values()), st["processes"]
    assert [p["adb"] for p in st["phones"]] == ["device", "device"]
    assert "com.google.android.gms" not in st["phones"][0]["running"]  # background, not launched


def test_stale_lab_of_a_killed_run_is_cleaned(workdir: Path, lab: Lab) -> None:
    import sys

    state = workdir / "state-killed"
    wd = workdir / "killed"
    code = (
        "from controller.lab.topology import Lab\n"
        f"Lab.up(phones=1, adb_port=None, workdir={str(wd)!r}, state_dir={str(state)!r}, mgmt_base=210)\n"
        "print('UP', flush=True)\n"
        "import time; time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            cwd=str(Path(__file__).resolve().parents[1]))  # fmt: skip
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "UP"
    finally:
        proc.kill()
        proc.wait()
    killed = Lab.load(state)
    assert killed is not None and killed.lab_id != lab.lab_id
    assert killed.lab_id in stale_lab_ids()
    # the state file is lost too: only the names lead to the leftovers
    (state / "lab.json").unlink()
    r = subprocess.run([sys.executable, "-m", "controller.cli", "lab", "down", "--state-dir",
                        str(state)], capture_output=True, text=True, timeout=60,
                       cwd=str(Path(__file__).resolve().parents[1]))  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert killed.lab_id in r.stdout
    assert lab_leftovers(killed.lab_id, str(wd)) == []
    assert lab.lab_id not in r.stdout and all(lab.status()["namespaces"].values())


def test_telegram_reaches_its_data_centre_over_ipv6_without_nat(lab: Lab, devices) -> None:  # type: ignore[no-untyped-def]
    from controller.lab.truth import read_truth

    phone, d = lab.phones[1], devices[1]
    assert phone.ip6.startswith("fd77:7466::")
    assert phone.ip6 in d.shell("ip -6 addr show dev wlan0")
    d.shell("am start -W -n org.telegram.messenger/org.telegram.ui.LaunchActivity")
    try:
        sock = wait_until(
            lambda: next(
                (t for t in read_truth(lab.truth_path)
                 if t.app == "org.telegram.messenger" and t.role == "chat" and t.end is None),
                None,
            ),
            timeout=10,
        )  # fmt: skip
        assert (sock.local_ip, sock.remote_ip, sock.remote_port) == (
            phone.ip6, "2001:67c:4e8:f004::a", 443)  # fmt: skip
        ss = subprocess.run(["ip", "netns", "exec", lab.ns("inet"), "ss", "-tn"],
                            capture_output=True, text=True).stdout  # fmt: skip
        assert f"[{phone.ip6}]:{sock.local_port}" in ss  # routed: the server sees the phone
    finally:
        d.shell("am force-stop org.telegram.messenger")
