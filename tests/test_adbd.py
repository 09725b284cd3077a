"""The emulated adbd against the real Debian adb server, driven through adbutils and the adb CLI.

Every test talks to a private adb server (its own port and HOME, killed at teardown) that
has attached the emulated phones with ``adb connect``; nothing here is mocked.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import adbutils
import pytest

from controller.errors import ConfigError, LabError
from controller.lab import toolbox_runtime as rt
from controller.lab.adbd import (
    A_VERSION,
    A_VERSION_MIN,
    HEADER,
    Command,
    EmulatedAdbd,
    Message,
    checksum,
    encode_message,
)
from controller.lab.toolbox import (
    PhoneConfig,
    Toolbox,
    load_phone_config,
    samsung_s21,
    xiaomi_poco_x3_pro,
)

REPO = Path(__file__).resolve().parents[1]
ADB = shutil.which("adb")
pytestmark = pytest.mark.skipif(ADB is None, reason="the Debian adb package is not installed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.05):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


class AdbServer:
    """A private real adb server: its port, environment and CLI."""

    def __init__(self, home: Path) -> None:
        self.port = free_port()
        self.env = dict(
            os.environ,
            HOME=str(home),
            ANDROID_SDK_HOME=str(home),
            ANDROID_USER_HOME=str(home / ".android"),
            TMPDIR=str(home),  # the server's log, adb.<uid>.log, goes here and not to /tmp
        )
        self.client = adbutils.AdbClient(host="127.0.0.1", port=self.port)

    def adb(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(ADB), "-P", str(self.port), *args],
            env=self.env,
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=timeout,
        )

    def attach(self, address: str) -> adbutils.AdbDevice:
        out = self.adb("connect", address)
        assert f"connected to {address}" in out.stdout, out
        wait_until(lambda: (address, "device") in self.states())
        return self.client.device(address)

    def states(self) -> list[tuple[str, str]]:
        return [(d.serial, d.state) for d in self.client.list()]


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="flowtruth-adbd-test-") as d:
        yield Path(d)


@pytest.fixture(scope="module")
def server(workdir: Path) -> Iterator[AdbServer]:
    home = workdir / "home"
    home.mkdir()
    srv = AdbServer(home)
    started = srv.adb("start-server")
    assert started.returncode == 0, started
    try:
        yield srv
    finally:
        srv.adb("kill-server")
        wait_until(lambda: not _port_open(srv.port), timeout=10)


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def samsung(server: AdbServer, workdir: Path) -> Iterator[tuple[EmulatedAdbd, adbutils.AdbDevice]]:
    adbd = EmulatedAdbd(samsung_s21(), "127.0.0.1", 0, workdir / "samsung").start()
    try:
        yield adbd, server.attach(adbd.address)
    finally:
        server.adb("disconnect", adbd.address)
        adbd.stop()


@pytest.fixture(scope="module")
def xiaomi(server: AdbServer, workdir: Path) -> Iterator[tuple[EmulatedAdbd, adbutils.AdbDevice]]:
    adbd = EmulatedAdbd(xiaomi_poco_x3_pro(), "127.0.0.1", 0, workdir / "xiaomi").start()
    try:
        yield adbd, server.attach(adbd.address)
    finally:
        server.adb("disconnect", adbd.address)
        adbd.stop()


def _procs_with(marker: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if marker.encode() in cmdline and int(entry) != os.getpid():
            found.append(int(entry))
    return found


# --------------------------------------------------------------------------- attach


def test_real_adb_server_lists_both_phones_as_devices(server, samsung, xiaomi):
    states = dict(server.states())
    assert states[samsung[0].address] == "device"
    assert states[xiaomi[0].address] == "device"
    listing = server.adb("devices", "-l").stdout
    assert "product:pa2qxeea model:SM_S936B device:pa2q" in listing
    assert "product:peridot_in model:24069PC21I device:peridot" in listing


def test_banner_features_reach_the_server(samsung):
    features = set(samsung[1].get_features().split(","))
    assert {"shell_v2", "cmd", "stat_v2", "ls_v2", "fixed_push_mkdir"} <= features


# --------------------------------------------------------------------------- shell


def test_shell_output_and_exit_codes(samsung):
    _, d = samsung
    assert d.shell("echo hi") == "hi"
    assert d.shell(["echo", "two words"]) == "two words"
    r = d.shell2("echo out; echo err >&2; exit 3", v2=True)
    assert (r.returncode, r.stdout, r.stderr) == (3, "out\n", "err\n")
    assert d.shell2("true", v2=True).returncode == 0
    assert d.shell2("kill -9 $$", v2=True).returncode == 137
    v1 = d.shell2("false")  # shell v1: adbutils appends `echo X4EXIT:$?`
    assert v1.returncode == 1
    merged = d.shell("echo a; echo b >&2")  # shell v1 merges stderr into stdout
    assert merged.split() == ["a", "b"]


def test_shell_large_output(samsung):
    _, d = samsung
    out = d.shell("head -c 5000000 /dev/zero | tr '\\0' x", encoding=None)
    assert out == b"x" * 5_000_000
    r = d.shell2(
        "head -c 3000000 /dev/zero | tr '\\0' y; head -c 70000 /dev/zero >&2",
        v2=True,
        encoding=None,
    )
    assert r.stdout == b"y" * 3_000_000 and len(r.stderr) == 70_000 and r.returncode == 0


def test_shell_streams_long_running_commands(samsung):
    _, d = samsung
    conn = d.shell("echo first; sleep 2; echo second", stream=True)
    try:
        conn.conn.settimeout(5)
        started = time.monotonic()
        first = conn.read(6)
        assert first == b"first\n"
        assert time.monotonic() - started < 1.5, "output must stream before the command ends"
        assert conn.read_until_close() == "second\n"
    finally:
        conn.close()


def test_closing_the_stream_kills_the_command(samsung):
    _, d = samsung
    marker = f"{1000 + secrets.randbelow(1000)}.{secrets.randbelow(10**6):06d}"
    conn = d.shell(f"sleep {marker}", stream=True)
    wait_until(lambda: _procs_with(f"sleep {marker}"), timeout=5)
    conn.close()
    try:
        wait_until(lambda: not _procs_with(f"sleep {marker}"), timeout=5)
    except AssertionError:
        for pid in _procs_with(f"sleep {marker}"):
            print(pid, Path(f"/proc/{pid}/stat").read_text())
        raise


def test_stdin_reaches_the_command(server, samsung):
    adbd, _ = samsung
    r = subprocess.run(
        [str(ADB), "-P", str(server.port), "-s", adbd.address, "shell", "tr a-z A-Z"],
        input="hello phone\n",
        env=server.env,
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert r.returncode == 0 and r.stdout == "HELLO PHONE\n"


def test_exec_service_is_raw_stdout_only(server, samsung):
    adbd, _ = samsung
    r = server.adb("-s", adbd.address, "exec-out", "printf 'a\\0b'; echo noise >&2")
    assert r.returncode == 0 and r.stdout == "a\0b"


def test_tcp_service_reaches_ports_on_the_phone(samsung):
    _, d = samsung
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def echo_once() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.sendall(b"echo:" + conn.recv(100))

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            done = pool.submit(echo_once)
            sock = d.create_connection(adbutils.Network.TCP, port)
            with sock:
                sock.settimeout(5)
                sock.sendall(b"ping")
                assert sock.recv(100) == b"echo:ping"
            done.result(timeout=5)


def test_pty_shells(server, samsung):
    adbd, _ = samsung

    def adb_bytes(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [str(ADB), "-P", str(server.port), "-s", adbd.address, *args],
            input=stdin,
            env=server.env,
            capture_output=True,
            timeout=20,
        )

    forced = adb_bytes("shell", "-tt", "tty; echo hi; exit 5")
    lines = forced.stdout.split(b"\r\n")  # a terminal turns \n into \r\n
    assert lines[0].startswith(b"/dev/pts/") and lines[1] == b"hi", forced
    assert forced.returncode == 5
    interactive = adb_bytes("shell", "-tt", stdin=b"getprop ro.product.device\nexit 3\n")
    assert b"pa2q:/ $ " in interactive.stdout  # the prompt of an interactive shell
    # The terminal echoes the typed lines, before or after the first prompt.
    assert re.search(rb"(\$ |\n)pa2q\r\n", interactive.stdout), interactive.stdout
    assert interactive.returncode == 3


# --------------------------------------------------------------------------- identity


def test_getprop(samsung, xiaomi):
    _, s = samsung
    _, x = xiaomi
    assert s.prop.model == "SM-S936B"
    assert s.getprop("ro.product.manufacturer") == "samsung"
    assert s.getprop("ro.build.version.release") == "16"
    assert s.getprop("ro.build.version.sdk") == "36"
    assert s.getprop("ro.product.cpu.abi") == "arm64-v8a"
    assert s.getprop("ro.serialno") == "R5CY743GDFY"
    assert x.prop.model == "24069PC21I"
    assert x.getprop("ro.product.manufacturer") == "Xiaomi"
    assert x.getprop("ro.build.version.release") == "15"
    listing = s.shell("getprop")
    assert "[ro.product.model]: [SM-S936B]" in listing.splitlines()


def test_su_gives_root_identity(samsung):
    _, d = samsung
    assert d.shell("id").startswith("uid=2000(shell) gid=2000(shell) groups=2000(shell),")
    root = "uid=0(root) gid=0(root) groups=0(root) context=u:r:magisk:s0"
    assert d.shell("su -c id") == root
    assert d.shell("su 0 id") == root
    assert d.shell(["su", "-c", "whoami; id -u"]).split()[0] == "root"
    assert d.root().strip() == "adbd cannot run as root in production builds"
    for service, answer in (("unroot:", "adbd not running as root"), ("reboot:", "reboot refused")):
        with d.open_transport() as c:
            c.send_command(service)
            c.check_okay()
            assert c.read_until_close().startswith(answer)
    assert d.shell("echo not rebooted") == "not rebooted"


# --------------------------------------------------------------------------- files


def test_push_and_pull_a_large_file(samsung, workdir):
    _, d = samsung
    data = os.urandom(20 * 1024 * 1024)
    src, back = workdir / "big.bin", workdir / "big.back"
    src.write_bytes(data)
    try:
        assert d.sync.push(src, "/data/local/tmp/big.bin", check=True) == len(data)
        assert d.sync.pull("/data/local/tmp/big.bin", back) == len(data)
        digest = hashlib.sha256(data).hexdigest()
        assert hashlib.sha256(back.read_bytes()).hexdigest() == digest
        # The shell sees the very same file at the device path.
        assert d.shell("sha256sum /data/local/tmp/big.bin").split()[0] == digest
    finally:
        src.unlink(missing_ok=True)
        back.unlink(missing_ok=True)
        d.shell("rm -f /data/local/tmp/big.bin")


def test_sync_stat_and_list(samsung):
    _, d = samsung
    d.sync.push(b"hello\n", "/sdcard/Download/note.txt", mode=0o644)
    info = d.sync.stat("/sdcard/Download/note.txt")
    assert info.size == 6 and info.mode & 0o170000 == 0o100000
    assert d.sync.stat("/sdcard/Download").mode & 0o170000 == 0o040000
    assert not d.sync.exists("/sdcard/nope.txt")
    names = {f.path for f in d.sync.list("/sdcard/Download")}
    assert {".", "..", "note.txt"} <= names
    assert d.sync.read_text("/sdcard/Download/note.txt") == "hello\n"
    assert d.shell("cat /sdcard/Download/note.txt") == "hello"
    with pytest.raises(adbutils.AdbError):
        d.sync.read_bytes("/sdcard/does-not-exist")
    with pytest.raises(adbutils.AdbError, match="FAIL"):
        d.sync.push(b"no", "/etc/flowtruth-must-not-exist")
    assert not Path("/etc/flowtruth-must-not-exist").exists()
    assert d.sync.read_text("/proc/net/tcp").lstrip().startswith("sl")


def _sync_request(c, ident: bytes, path: str) -> None:  # type: ignore[no-untyped-def]
    raw = path.encode()
    c.conn.sendall(ident + struct.pack("<I", len(raw)) + raw)


def test_sync_v2_requests(samsung):
    _, d = samsung
    d.sync.push(b"v2 body", "/data/local/tmp/v2.txt", mode=0o600)
    d.shell("ln -sf /data/local/tmp/v2.txt /data/local/tmp/v2.lnk")
    c = d.open_transport()
    try:
        c.send_command("sync:")
        c.check_okay()
        _sync_request(c, b"STA2", "/data/local/tmp/v2.lnk")  # follows the link
        ident, error, _dev, _ino, mode, _nl, _uid, _gid, size, _a, mtime, _c = struct.unpack(
            "<4sIQQIIIIQqqq", c.read_exact(72)
        )
        assert (ident, error, mode & 0o170000, size) == (b"STA2", 0, 0o100000, 7)
        assert abs(mtime - time.time()) < 60
        _sync_request(c, b"LST2", "/data/local/tmp/v2.lnk")  # does not
        ident, error, *_rest = struct.unpack("<4sIQQIIIIQqqq", c.read_exact(72))
        assert ident == b"LST2" and _rest[2] & 0o170000 == 0o120000
        _sync_request(c, b"STA2", "/data/local/tmp/missing")
        ident, error = struct.unpack("<4sI", c.read_exact(72)[:8])
        assert (ident, error) == (b"STA2", 2)  # ENOENT
        _sync_request(c, b"LIS2", "/data/local/tmp")
        names = set()
        while True:
            head = c.read_exact(76)
            if head[:4] == b"DONE":
                break
            assert head[:4] == b"DNT2"
            names.add(c.read_exact(struct.unpack("<I", head[72:])[0]).decode())
        assert {"v2.txt", "v2.lnk"} <= names
        _sync_request(c, b"SND2", "/data/local/tmp/snd2.txt")
        c.conn.sendall(b"SND2" + struct.pack("<II", 0o100644, 0))
        c.conn.sendall(b"DATA" + struct.pack("<I", 5) + b"sent2" + b"DONE" + struct.pack("<I", 0))
        assert c.read_exact(8) == b"OKAY" + bytes(4)
        _sync_request(c, b"RCV2", "/data/local/tmp/snd2.txt")
        c.conn.sendall(b"RCV2" + struct.pack("<I", 0))
        assert c.read_exact(13) == b"DATA" + struct.pack("<I", 5) + b"sent2"
        assert c.read_exact(8) == b"DONE" + bytes(4)
        _sync_request(c, b"QUIT", "")
        assert c.read(1) == b""  # the service ends the stream
    finally:
        c.close()


def test_adb_cli_shell_push_and_pull(server, samsung, workdir):
    adbd, _ = samsung
    r = server.adb("-s", adbd.address, "shell", "echo hi")
    assert (r.returncode, r.stdout) == (0, "hi\n")
    assert server.adb("-s", adbd.address, "shell", "exit 4").returncode == 4
    src, back = workdir / "cli.bin", workdir / "cli.back"
    src.write_bytes(os.urandom(300_000))
    try:
        pushed = server.adb("-s", adbd.address, "push", str(src), "/data/local/tmp/cli.bin")
        assert pushed.returncode == 0, pushed
        pulled = server.adb("-s", adbd.address, "pull", "/data/local/tmp/cli.bin", str(back))
        assert pulled.returncode == 0, pulled
        assert back.read_bytes() == src.read_bytes()
        ls = server.adb("-s", adbd.address, "ls", "/data/local/tmp")
        assert "cli.bin" in ls.stdout
        refused = server.adb("-s", adbd.address, "push", str(src), "/system/bin/cli.bin")
        assert refused.returncode == 1
        assert "Read-only file system" in refused.stdout + refused.stderr
    finally:
        src.unlink(missing_ok=True)
        back.unlink(missing_ok=True)


# --------------------------------------------------------------------------- toolbox


def test_pm_lists_packages_with_uids(samsung):
    _, d = samsung
    packages = d.list_packages()
    for name in (
        "org.thoughtcrime.securesms",
        "org.telegram.messenger",
        "com.whatsapp",
        "com.google.android.gms",
        "com.android.chrome",
    ):
        assert name in packages
    lines = d.shell("pm list packages -U").splitlines()
    assert "package:org.telegram.messenger uid:10251" in lines
    assert "package:com.whatsapp uid:10234" in lines
    versions = d.shell("pm list packages --show-versioncode com.whatsapp")
    assert versions == "package:com.whatsapp versionCode:241175001"
    assert d.shell("pm path org.thoughtcrime.securesms").startswith("package:/data/app/")
    assert d.app_info("org.telegram.messenger").version_name == "10.13.4"


def pids_of(d: adbutils.AdbDevice, name: str) -> list[int]:
    return [int(p) for p in d.shell(["pidof", name]).split()]


def test_am_start_pidof_and_force_stop(samsung):
    adbd, d = samsung
    out = d.shell("am start -W -n org.telegram.messenger/org.telegram.ui.LaunchActivity")
    lines = out.splitlines()
    short = "org.telegram.messenger/org.telegram.ui.LaunchActivity"
    assert lines[0] == f"Starting: Intent {{ cmp={short} }}"
    assert lines[1:4] == ["Status: ok", "LaunchState: COLD", f"Activity: {short}"]
    assert lines[4].startswith("TotalTime: ") and lines[5].startswith("WaitTime: ")
    assert lines[-1] == "Complete"
    # pidof also reports real processes of that name in the phone's network namespace; this
    # phone shares the host's, where other tests may run such processes.
    state = rt.read_state(adbd.state_dir)
    pid = state["running"]["org.telegram.messenger"]["pid"]
    assert pid in pids_of(d, "org.telegram.messenger")
    assert state["foreground"]["package"] == "org.telegram.messenger"
    assert d.app_current().package == "org.telegram.messenger"
    again = d.shell("am start -W -n org.telegram.messenger/org.telegram.ui.LaunchActivity")
    assert "currently running top-most instance" in again
    d.keyevent("HOME")  # back to the launcher; the app keeps running
    assert rt.read_state(adbd.state_dir)["foreground"] is None
    warm = d.shell("am start -W -n org.telegram.messenger/org.telegram.ui.LaunchActivity")
    assert "LaunchState: HOT" in warm.splitlines()
    assert pid in pids_of(d, "org.telegram.messenger")
    d.shell("am force-stop org.telegram.messenger")
    assert pid not in pids_of(d, "org.telegram.messenger")
    assert rt.read_state(adbd.state_dir)["foreground"] is None
    d.app_start("org.thoughtcrime.securesms")  # adbutils launches through monkey
    assert d.app_current().package == "org.thoughtcrime.securesms"
    d.app_stop("org.thoughtcrime.securesms")


def test_uiautomator_dump_is_real_hierarchy_xml(samsung, workdir):
    adbd, d = samsung
    d.shell("am start -W -n com.whatsapp/.home.ui.HomeActivity")
    assert d.shell("uiautomator dump") == "UI hierchary dumped to: /sdcard/window_dump.xml"
    local = workdir / "window_dump.xml"
    d.sync.pull("/sdcard/window_dump.xml", local)
    root = ET.parse(local).getroot()
    local.unlink()
    assert root.tag == "hierarchy" and root.get("rotation") == "0"
    nodes = list(root.iter("node"))
    assert nodes and all(n.get("package") == "com.whatsapp" for n in nodes)
    assert {"bounds", "class", "resource-id", "content-desc", "clickable"} <= set(nodes[0].keys())
    assert any(n.get("text") == "WhatsApp" for n in nodes)
    # A simulated app publishes its own screen through the state file.
    screen = rt.make_hierarchy(
        [
            rt.make_node(
                "android.widget.Button",
                "com.whatsapp",
                (0, 0, 100, 100),
                text="Send",
                clickable=True,
            )
        ]
    )

    def publish(state):
        state["screens"]["com.whatsapp"] = screen

    rt.update_state(adbd.state_dir, publish)
    xml = d.dump_hierarchy()  # adbutils: uiautomator dump to /data/local/tmp + sync pull
    assert ET.fromstring(xml).find("node").get("text") == "Send"
    d.shell("am force-stop com.whatsapp")


def test_input_settings_and_battery(samsung):
    adbd, d = samsung
    d.click(540, 1200)
    d.send_keys("hello")
    d.keyevent("BACK")
    d.swipe(100, 1500, 100, 500, 0.3)
    log = (adbd.state_dir / rt.INPUT_LOG).read_text().splitlines()[-4:]
    kinds = [json.loads(line)["kind"] for line in log]
    assert kinds == ["tap", "text", "keyevent", "swipe"]
    assert json.loads(log[0])["args"] == ["540", "1200"]
    assert d.shell2("input bogus", v2=True).returncode == 1
    d.shell("settings put global http_proxy 10.0.0.1:8080")
    assert d.shell("settings get global http_proxy") == "10.0.0.1:8080"
    assert d.shell("settings get secure nothing_here") == "null"
    battery = d.battery()
    assert battery.level == 87 and battery.scale == 100 and battery.usb_powered is True


def test_logcat_screencap_and_getenforce(samsung):
    adbd, d = samsung
    d.shell("logcat -c")
    with open(adbd.state_dir / rt.LOGCAT_FILE, "a") as f:
        f.write("11-28 22:00:00.000  4242  4242 I Signal  : websocket connected\n")
    assert d.shell("logcat -d").endswith("websocket connected")
    follow = d.shell("logcat", stream=True)
    try:
        follow.conn.settimeout(5)
        seen = b""
        while b"websocket connected" not in seen:
            chunk = follow.conn.recv(4096)
            assert chunk, "logcat ended instead of following"
            seen += chunk
    finally:
        follow.close()
    image = d.screenshot()
    assert image.size == (1080, 2400)
    assert d.shell("getenforce") == "Enforcing"


def test_each_phone_has_its_own_clock_offset(samsung, xiaomi):
    for (_adbd, d), offset in ((samsung, 2.375), (xiaomi, -1.625)):
        before = time.time()
        phone_now = float(d.shell("date +%s.%N"))
        after = time.time()
        assert before + offset - 0.05 <= phone_now <= after + offset + 0.05


# --------------------------------------------------------------------------- robustness


def test_unknown_service_is_refused(samsung):
    _, d = samsung
    c = d.open_transport()
    try:
        c.send_command("frobnicate:now")
        with pytest.raises(adbutils.AdbError):
            c.check_okay()
    finally:
        c.close()
    assert d.shell("echo still here") == "still here"


def _raw_cnxn(port: int, version: int) -> tuple[Message, int]:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        payload = b"host::features=shell_v2\0"
        s.sendall(encode_message(Message(Command.CNXN, version, 256 * 1024, payload), True))
        header = _recv_exactly(s, HEADER.size)
        command, arg0, arg1, length, crc, magic = HEADER.unpack(header)
        data = _recv_exactly(s, length)
        assert magic == command ^ 0xFFFFFFFF
        return Message(command, arg0, arg1, data), crc


def _recv_exactly(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return buf


def test_handshake_checksum_follows_the_negotiated_version(samsung):
    adbd, _ = samsung
    legacy, legacy_crc = _raw_cnxn(adbd.port, A_VERSION_MIN)
    assert legacy.command == Command.CNXN and legacy.arg1 == 256 * 1024
    assert legacy.data.startswith(b"device::ro.product.name=pa2qxeea;ro.product.model=SM-S936B;")
    assert legacy_crc == checksum(legacy.data)
    modern, modern_crc = _raw_cnxn(adbd.port, A_VERSION)
    assert modern.arg0 == A_VERSION and modern_crc == 0


def test_garbage_connections_do_not_take_the_server_down(samsung):
    adbd, d = samsung
    bad_magic = HEADER.pack(Command.CNXN, A_VERSION, 4096, 0, 0, 0x12345678)
    huge = HEADER.pack(Command.CNXN, A_VERSION, 4096, 1 << 30, 0, Command.CNXN ^ 0xFFFFFFFF)
    bad_sum = encode_message(Message(Command.CNXN, A_VERSION_MIN, 4096, b"host::\0"), True)
    bad_sum = bad_sum[:16] + struct.pack("<I", 1) + bad_sum[20:]
    open_first = encode_message(Message(Command.OPEN, 1, 0, b"shell:id\0"), True)
    for junk in (os.urandom(100), bad_magic, huge, bad_sum, open_first, b"\x00" * 10):
        with socket.create_connection(("127.0.0.1", adbd.port), timeout=5) as s:
            s.sendall(junk)
            if len(junk) >= 24:  # a complete (bad) header: the adbd hangs up on us
                assert s.recv(4096) == b""
    assert d.shell("echo alive") == "alive"
    # A well-formed stranger that opens a stream and vanishes mid-command is no problem either.
    with socket.create_connection(("127.0.0.1", adbd.port), timeout=5) as s:
        s.sendall(encode_message(Message(Command.CNXN, A_VERSION, 4096, b"host::\0"), True))
        reply = HEADER.unpack(_recv_exactly(s, HEADER.size))
        _recv_exactly(s, reply[3])
        s.sendall(encode_message(Message(Command.OPEN, 7, 0, b"shell:sleep 5\0"), False))
    assert d.shell("echo alive") == "alive"


class RawHost:
    """A minimal host side of the wire protocol, to check what the adbd puts on the wire."""

    def __init__(self, port: int, max_payload: int = 4096) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.send(Message(Command.CNXN, A_VERSION, max_payload, b"host::\0"), legacy=True)
        banner = self.recv()
        assert banner.command == Command.CNXN and banner.arg1 == max_payload

    def send(self, msg: Message, legacy: bool = False) -> None:
        self.sock.sendall(encode_message(msg, with_checksum=legacy))

    def recv(self, timeout: float = 5) -> Message:
        self.sock.settimeout(timeout)
        command, arg0, arg1, length, _, _ = HEADER.unpack(_recv_exactly(self.sock, HEADER.size))
        return Message(command, arg0, arg1, _recv_exactly(self.sock, length))

    def close(self) -> None:
        self.sock.close()


def test_streams_follow_adb_flow_control(samsung):
    adbd, _ = samsung
    host = RawHost(adbd.port, max_payload=4096)
    try:
        host.send(Message(Command.OPEN, 41, 0, b"no-such-service:\0"))
        refused = host.recv()
        assert (refused.command, refused.arg0, refused.arg1) == (Command.CLSE, 0, 41)

        host.send(Message(Command.OPEN, 42, 0, b"shell:head -c 20000 /dev/zero\0"))
        okay = host.recv()
        assert okay.command == Command.OKAY and okay.arg1 == 42 and okay.arg0 != 0
        ours = okay.arg0
        first = host.recv()
        assert (first.command, first.arg0, first.arg1) == (Command.WRTE, ours, 42)
        assert len(first.data) <= 4096
        with pytest.raises(TimeoutError):  # nothing more until we acknowledge
            host.recv(timeout=0.5)
        received = len(first.data)
        while True:
            host.send(Message(Command.OKAY, 42, ours))
            msg = host.recv()
            if msg.command == Command.CLSE:
                assert (msg.arg0, msg.arg1) == (ours, 42)
                break
            assert msg.command == Command.WRTE and len(msg.data) <= 4096
            received += len(msg.data)
        assert received == 20000
    finally:
        host.close()


def test_stream_closed_while_the_command_starts_leaves_nothing(samsung):
    adbd, _ = samsung
    host = RawHost(adbd.port)
    markers = [f"{3000 + i}.{secrets.randbelow(10**6):06d}" for i in range(5)]
    try:
        for i, marker in enumerate(markers):
            host.send(Message(Command.OPEN, 100 + i, 0, f"shell:sleep {marker}\0".encode()))
            if i % 2:  # closed before the host learnt our id: CLSE(local, 0)
                host.send(Message(Command.CLSE, 100 + i, 0))
            okay = host.recv()
            assert (okay.command, okay.arg1) == (Command.OKAY, 100 + i)
            if not i % 2:  # closed as soon as the OKAY arrives, while the command starts
                host.send(Message(Command.CLSE, 100 + i, okay.arg0))
        time.sleep(1.0)  # let every spawn finish, as far as it gets
        for marker in markers:
            try:
                wait_until(lambda m=marker: not _procs_with(f"sleep {m}"), timeout=5)
            except AssertionError:
                for pid in _procs_with(f"sleep {marker}"):
                    print(marker, pid, Path(f"/proc/{pid}/stat").read_text()[:60])
                raise
    finally:
        host.close()


def test_many_commands_share_one_connection(samsung):
    _, d = samsung
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(
            pool.map(lambda i: d.shell2(f"sleep 0.2; echo {i}; exit {i}", v2=True), range(8))
        )
    assert [(r.stdout, r.returncode) for r in results] == [(f"{i}\n", i) for i in range(8)]


def _spawn_adbd(args: list[str]) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        args,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("listening on "):
        proc.kill()
        _, err = proc.communicate(timeout=10)
        raise AssertionError(f"adbd did not start: {line!r} {err}")
    return proc, line.split()[-1]


def test_killed_adbd_makes_adbutils_fail_promptly(server, workdir):
    port = free_port()
    proc, address = _spawn_adbd(
        [
            sys.executable,
            "-m",
            "controller.lab.adbd",
            "--preset",
            "xiaomi-m2102j20sg",
            "--serial",
            "killme01",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--state-dir",
            str(workdir / "killme"),
        ]
    )
    marker = f"{2000 + secrets.randbelow(1000)}.{secrets.randbelow(10**6):06d}"
    try:
        d = server.attach(address)
        assert d.getprop("ro.serialno") == "killme01"
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pending = pool.submit(d.shell2, f"sleep {marker}", timeout=30, v2=True)
            wait_until(lambda: _procs_with(f"sleep {marker}"), timeout=5)
            killed_at = time.monotonic()
            proc.send_signal(signal.SIGKILL)
            with pytest.raises((EOFError, adbutils.AdbError, OSError)):
                pending.result(timeout=15)
            assert time.monotonic() - killed_at < 10
        # The command died with its adbd (PR_SET_PDEATHSIG), nothing is left behind.
        wait_until(lambda: not _procs_with(f"sleep {marker}"), timeout=5)
    finally:
        proc.kill()
        proc.communicate(timeout=10)
        server.adb("disconnect", address)


def test_adbd_entry_point_stops_cleanly_on_sigterm(server, workdir):
    config = workdir / "phone.yaml"
    config.write_text("preset: samsung-sm-g991b\nserial: cfgphone1\nclock_offset_s: 0.5\n")
    proc, address = _spawn_adbd(
        [
            sys.executable,
            "-m",
            "controller.lab.adbd",
            "--config",
            str(config),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--state-dir",
            str(workdir / "cfgphone"),
        ]
    )
    try:
        d = server.attach(address)
        assert d.getprop("ro.serialno") == "cfgphone1"
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0
        proc.communicate()
        server.adb("disconnect", address)


def test_known_failures_are_one_line_errors(samsung, workdir):
    adbd, _ = samsung
    with pytest.raises(LabError, match="cannot listen"):
        EmulatedAdbd(xiaomi_poco_x3_pro(), "127.0.0.1", adbd.port).start()
    missing = subprocess.run(
        [sys.executable, "-m", "controller.lab.adbd", "--config", str(workdir / "nope.yaml")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert missing.returncode == 2
    assert missing.stderr.startswith("adbd: ") and "Traceback" not in missing.stderr


# --------------------------------------------------------------------------- config, non-root


def test_bad_phone_config_names_file_and_field(workdir):
    bad = workdir / "bad.yaml"
    bad.write_text("preset: samsung-sm-g991b\nbattery_level: 170\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: battery_level"):
        load_phone_config(bad)
    bad.write_text("preset: nokia-3310\n")
    with pytest.raises(ConfigError, match="unknown phone"):
        load_phone_config(bad)


def test_without_mount_namespace_device_paths_are_rewritten(workdir):
    tb = Toolbox(samsung_s21(), workdir / "plain", use_mount_namespace=False)
    tb.prepare()
    cmd = "echo x > /data/local/tmp/f && cat /data/local/tmp/f && ls /sdcard; getprop ro.product.model"
    r = subprocess.run(
        tb.argv(cmd), env=tb.environment(), capture_output=True, text=True, timeout=20
    )
    assert r.stdout.splitlines() == ["x", "Download", "SM-S936B"], r
    assert (tb.state_dir / "fs/data/local/tmp/f").read_text() == "x\n"
    assert tb.fs_path("/sdcard/a") == tb.state_dir / "fs/storage/emulated/0/a"
    assert tb.fs_path("/proc/net/tcp") == Path("/proc/net/tcp")
    assert isinstance(tb.config, PhoneConfig)


# --------------------------------------------------------------------------- namespace


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root and ip")
def test_adbd_inside_a_network_namespace(server, workdir):
    tag = secrets.token_hex(3)
    ns, host_if, ns_if = f"ftadb{tag}", f"fth{tag}", f"ftp{tag}"
    octet = 16 + secrets.randbelow(200)
    host_ip, phone_ip = f"10.231.{octet}.1", f"10.231.{octet}.2"

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)

    proc = None
    address = f"{phone_ip}:5555"
    ip("netns", "add", ns)
    try:
        ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        ip("link", "set", ns_if, "netns", ns)
        ip("addr", "add", f"{host_ip}/30", "dev", host_if)
        ip("link", "set", host_if, "up")
        ip("netns", "exec", ns, "ip", "addr", "add", f"{phone_ip}/30", "dev", ns_if)
        ip("netns", "exec", ns, "ip", "link", "set", ns_if, "up")
        ip("netns", "exec", ns, "ip", "link", "set", "lo", "up")
        proc, _ = _spawn_adbd(
            [
                "ip",
                "netns",
                "exec",
                ns,
                sys.executable,
                "-m",
                "controller.lab.adbd",
                "--preset",
                "samsung-sm-g991b",
                "--serial",
                "nsphone1",
                "--host",
                "0.0.0.0",
                "--port",
                "5555",
                "--state-dir",
                str(workdir / "nsphone"),
            ]
        )
        d = server.attach(address)
        assert d.getprop("ro.serialno") == "nsphone1"
        addrs = d.shell("ip -o -4 addr show")
        assert phone_ip in addrs and host_ip not in addrs
        assert ns_if in d.shell("cat /proc/net/dev")
        assert d.shell("su -c id").startswith("uid=0(root)")
        # pidof sees only the phone's namespace: not the adb server on the host, but its adbd.
        assert d.shell2("pidof adb", v2=True).returncode == 1
        assert proc.pid in pids_of(d, "ip") + pids_of(d, "python") + pids_of(d, "python3")
        # An adbd on the host whose shell enters the namespace (EmulatedAdbd(netns=...)).
        with EmulatedAdbd(
            samsung_s21(serial="nsphone2"), "127.0.0.1", 0, workdir / "nsphone2", netns=ns
        ) as host_side:
            d2 = server.attach(host_side.address)
            try:
                assert phone_ip in d2.shell("ip -o -4 addr show")
                assert ns_if in d2.shell("cat /proc/net/dev")
                assert d2.shell("su -c id").startswith("uid=0(root)")
            finally:
                server.adb("disconnect", host_side.address)
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
            proc.communicate()
        server.adb("disconnect", address)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
        subprocess.run(["ip", "link", "del", host_if], capture_output=True, timeout=10)
