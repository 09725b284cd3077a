"""A minimal virtual lab for the session-engine tests: an AP namespace with a bridge,
phones as namespaces each served by an emulated adbd *process* (so a test can kill it),
a private real adb server, traffic-making "apps" and an echo server at the AP.

The apps are Python processes in the phone namespace whose argv[0] and comm are the
package name, running under the package's uid (as zygote gives them), so the real strace
launcher finds them with ``pidof``; each talks TCP to its own port at the AP every 0.2 s.
The phones' screens are seeded with the nodes the shipped scenarios tap (a conversation
screen with call buttons and an "End call" button, like the lab's simulated apps).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from controller.lab import toolbox_runtime as rt
from controller.lab.toolbox import PhoneConfig, samsung_s21, xiaomi_poco_x3_pro
from tests.netns import Netns, NetnsLab, netns_skip_reason

ADB = shutil.which("adb")
CLIENT_PY = next((p for p in ("/usr/bin/python3", "/usr/local/bin/python3")
                  if os.access(p, os.X_OK)), None)
APP_PORTS = {"org.thoughtcrime.securesms": 7101, "org.telegram.messenger": 7102,
             "com.whatsapp": 7103}
AP_V4 = "10.78.0.1"
VLAB_SCENARIOS = Path(__file__).resolve().parent / "data" / "vlab_scenarios"


def skip_reason() -> str | None:
    r = netns_skip_reason("tcpdump", "strace", "setsid")
    if r:
        return r
    if ADB is None:
        return "the Debian adb package is not installed"
    if CLIENT_PY is None:
        return "no system-wide python3 for the app uids"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


SERVER = r'''
import socket, sys, threading
def serve(c):
    with c:
        c.settimeout(10)
        try:
            while True:
                d = c.recv(4096)
                if not d:
                    break
                c.sendall(d)
        except OSError:
            pass
def loop(s):
    while True:
        c, _ = s.accept()
        threading.Thread(target=serve, args=(c,), daemon=True).start()
for port in map(int, sys.argv[1:]):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port)); s.listen(128)
    threading.Thread(target=loop, args=(s,), daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
'''

APP = r'''
import ctypes, socket, sys, time
name, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
ctypes.CDLL(None).prctl(15, name[-15:].encode(), 0, 0, 0)
while True:
    try:
        with socket.create_connection((host, port), timeout=3) as s:
            s.sendall(name.encode() * 20)
            got = 0
            while got < len(name) * 20:
                d = s.recv(4096)
                if not d:
                    break
                got += len(d)
    except OSError:
        pass
    time.sleep(0.2)
'''


def _node(pkg: str, y: int, **kw: Any) -> str:
    return rt.make_node("android.widget.TextView", pkg, (40, y, 1040, y + 90), clickable=True, **kw)


def seed_screens(state_dir: Path, contact: str = "Alice") -> None:
    """Publish one screen per messenger holding every node the shipped scenarios use."""
    screens = {}
    for pkg, nodes in {
        "org.thoughtcrime.securesms": [
            dict(text=contact, resource_id="org.thoughtcrime.securesms:id/conversation_title_view"),
            dict(resource_id="org.thoughtcrime.securesms:id/embedded_text_editor"),
            dict(resource_id="org.thoughtcrime.securesms:id/send_button", content_desc="Send"),
            dict(resource_id="org.thoughtcrime.securesms:id/attach_button"),
            dict(resource_id="org.thoughtcrime.securesms:id/menu_call_secure"),
            dict(resource_id="org.thoughtcrime.securesms:id/menu_video_secure"),
            dict(content_desc="End call")],
        "org.telegram.messenger": [
            dict(text=contact), dict(text="Message"), dict(content_desc="Send"),
            dict(content_desc="Attach media"), dict(content_desc="Call"),
            dict(content_desc="Video call"), dict(content_desc="End call")],
        "com.whatsapp": [
            dict(text=contact, resource_id="com.whatsapp:id/conversation_contact_name"),
            dict(resource_id="com.whatsapp:id/entry"), dict(resource_id="com.whatsapp:id/send"),
            dict(resource_id="com.whatsapp:id/input_attach_button"),
            dict(resource_id="com.whatsapp:id/menuitem_voice_call"),
            dict(resource_id="com.whatsapp:id/menuitem_video_call"),
            dict(content_desc="End call")],
    }.items():
        kids = [_node(pkg, 200 + 100 * i, index=i, **n) for i, n in enumerate(nodes)]
        root = rt.make_node("android.widget.FrameLayout", pkg, (0, 0, 1080, 2400), children=kids)
        screens[pkg] = rt.make_hierarchy([root])

    def put(s: dict[str, Any]) -> None:
        s["screens"] = screens

    rt.update_state(state_dir, put)


@dataclass
class Phone:
    name: str
    ns: Netns
    config: PhoneConfig
    ip: str
    state_dir: Path
    proc: subprocess.Popen[str] | None = None
    address: str = ""

    def kill_adbd(self) -> None:
        """SIGKILL the emulated adbd, as a phone whose USB cable is pulled."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)


@dataclass
class VLab:
    tmp: Path
    lab: NetnsLab
    ap: Netns
    phones: list[Phone] = field(default_factory=list)
    adb_port: int = 0
    adb_env: dict[str, str] = field(default_factory=dict)
    client: Any = None

    def adb(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(ADB), "-P", str(self.adb_port), *args], env=self.adb_env,
                              capture_output=True, text=True, timeout=60,
                              stdin=subprocess.DEVNULL)

    saved_scenario_dir: str | None = None

    def close(self) -> None:
        if self.saved_scenario_dir is None:
            os.environ.pop("FLOWTRUTH_SCENARIO_DIR", None)
        else:
            os.environ["FLOWTRUTH_SCENARIO_DIR"] = self.saved_scenario_dir
        for p in self.phones:
            if p.address:
                self.adb("disconnect", p.address)
            if p.proc is not None and p.proc.poll() is None:
                p.proc.terminate()
                try:
                    p.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.proc.kill()
                    p.proc.wait()
        if self.adb_port:
            self.adb("kill-server")
        self.lab.close()


def start_vlab(n_phones: int = 2, clock_offsets: tuple[float, ...] = (0.0, 0.25),
               phone_updates: dict[str, Any] | None = None) -> VLab:
    """Bring up the namespaces, adb server, adbds, apps and echo server (close() undoes all);
    ``phone_updates`` sets PhoneConfig fields of every phone (failure modes)."""
    tmp = Path(tempfile.mkdtemp(prefix="flowtruth-vlab-"))
    lab = NetnsLab("ftv")
    vl = VLab(tmp, lab, lab.add("ap"))
    # static screens: sessions here run the simple scenarios of tests/data/vlab_scenarios
    vl.saved_scenario_dir = os.environ.get("FLOWTRUTH_SCENARIO_DIR")
    os.environ["FLOWTRUTH_SCENARIO_DIR"] = str(VLAB_SCENARIOS)
    try:
        vl.ap.run(["ip", "link", "add", "br0", "type", "bridge"])
        vl.ap.run(["ip", "addr", "add", f"{AP_V4}/24", "dev", "br0"])
        vl.ap.run(["ip", "link", "set", "br0", "up"])
        presets = [samsung_s21, xiaomi_poco_x3_pro]
        for i in range(n_phones):
            ns = lab.add(f"p{i}")
            ip = f"10.78.0.{11 + i}"
            lab.veth(ns, "wlan0", vl.ap, f"a{i}", [f"{ip}/24"], [])
            vl.ap.run(["ip", "link", "set", f"a{i}", "master", "br0"])
            cfg = presets[i % 2](serial=f"VLAB{i:04d}",
                                 clock_offset_s=clock_offsets[i % len(clock_offsets)])
            # the presets speak their real dumps' languages (es-ES, en-IN); the scenarios' table
            # has en and de
            cfg = cfg.model_copy(update={"abi": "x86_64", "locale": "en-US",
                                         **(phone_updates or {})})
            vl.phones.append(Phone(f"phone{i}", ns, cfg, ip, tmp / f"phone{i}"))
        srv = vl.ap.popen([sys.executable, "-c", SERVER, *map(str, APP_PORTS.values())],
                          stdout=subprocess.PIPE, text=True)
        assert srv.stdout is not None and srv.stdout.readline().strip() == "ready"
        # a private adb server
        home = tmp / "home"
        home.mkdir()
        vl.adb_port = free_port()
        vl.adb_env = dict(os.environ, HOME=str(home), ANDROID_SDK_HOME=str(home),
                          ANDROID_USER_HOME=str(home / ".android"), TMPDIR=str(home))
        r = vl.adb("start-server")
        assert r.returncode == 0, r
        from controller.device import adb_client

        vl.client = adb_client(vl.adb_port)
        for ph in vl.phones:
            start_adbd(vl, ph)
            for pkg, port in APP_PORTS.items():
                uid = ph.config.packages[pkg].uid
                assert CLIENT_PY is not None
                ph.ns.popen([pkg, "-I", "-S", "-c", APP, pkg, AP_V4, str(port)],
                            executable=CLIENT_PY, uid=uid, gid=uid,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except BaseException:
        vl.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return vl


def start_adbd(vl: VLab, ph: Phone) -> None:
    cfg_file = vl.tmp / f"{ph.name}.json"
    cfg_file.write_text(json.dumps(ph.config.model_dump()))
    ph.proc = subprocess.Popen(
        [sys.executable, "-m", "controller.lab.adbd", "--config", str(cfg_file),
         "--host", "127.0.0.1", "--port", "0", "--state-dir", str(ph.state_dir),
         "--netns", ph.ns.name],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        cwd=str(Path(__file__).resolve().parents[1]), start_new_session=True)
    assert ph.proc.stdout is not None
    line = ph.proc.stdout.readline().strip()
    assert line.startswith("listening on "), line
    ph.address = line.split()[-1]
    seed_screens(ph.state_dir)
    r = vl.adb("connect", ph.address)
    assert f"connected to {ph.address}" in r.stdout, r
    deadline = time.monotonic() + 10
    while (ph.address, "device") not in [(d.serial, d.state) for d in vl.client.list()]:
        assert time.monotonic() < deadline, "adbd never became a device"
        time.sleep(0.05)


@dataclass
class PrivateLab:
    """The full virtual lab (``controller.lab.topology.Lab``) with its own adb server."""

    lab: Any
    port: int
    env: dict[str, str]
    """Environment for subprocesses (``flowtruth`` CLI runs) that use this lab's adb."""

    def adb(self, *a: str) -> None:
        subprocess.run([ADB or "adb", "-P", str(self.port), *a], env=self.env,
                       capture_output=True, stdin=subprocess.DEVNULL, timeout=30)


def private_lab(tmp_path: Path, phones: int, mgmt_base: int, **up: Any) -> Any:
    """A context manager: the real virtual lab with a private adb server, state dir and HOME
    under ``tmp_path`` (never the default lab), skipped where the lab cannot run; the lab
    goes down and the adb server is killed on exit. ``mgmt_base`` keeps concurrently
    running labs' management subnets apart."""
    import contextlib

    import pytest

    @contextlib.contextmanager
    def cm() -> Any:
        try:
            from controller.lab import topology
        except ImportError as exc:
            pytest.skip(f"the virtual lab is not installed: {exc}")
        reason = topology.skip_reason()
        if reason or ADB is None:
            pytest.skip(reason or "adb is not installed")
        home = tmp_path / "home"
        home.mkdir(exist_ok=True)
        env = dict(os.environ, HOME=str(home), ANDROID_USER_HOME=str(home / ".android"),
                   TMPDIR=str(home), FLOWTRUTH_LAB_STATE_DIR=str(tmp_path / "state"),
                   COLUMNS="200")
        # the real lab runs the shipped scenarios, not the static test lab's (a module's
        # vlab fixture may still have FLOWTRUTH_SCENARIO_DIR set)
        env.pop("FLOWTRUTH_SCENARIO_DIR", None)
        pl = PrivateLab(None, free_port(), env)
        pl.adb("start-server")
        try:
            pl.lab = topology.Lab.up(phones=phones, adb_port=pl.port, workdir=tmp_path / "lab",
                                     state_dir=tmp_path / "state", mgmt_base=mgmt_base,
                                     **up)
            try:
                yield pl
            finally:
                pl.lab.down()
        finally:
            pl.adb("kill-server")

    return cm()
