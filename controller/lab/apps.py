"""Simulated apps on a lab phone: real processes with real sockets, driven by ``am``/``input``.

One *app manager* runs per phone, as root inside the phone's network namespace
(``python -m controller.lab.apps manager --state-dir DIR --truth FILE --ca CA``).  It
watches the phone's ``state.json`` and ``input_events.jsonl`` (written by the toolbox
shims ``am``, ``input`` ...) and

- starts one process per package that ``am start`` marked running, and the always-on
  background apps (``com.google.android.gms``, ``com.android.chrome``); stops a process
  on ``am force-stop``;
- publishes each messenger's screens (uiautomator XML) in the state, so scenario steps
  find the elements by resource-id, text or content-desc, and turns taps on them into
  actions: send a chat message, upload media, start or end a voice or video call;
  ``input text`` (or text ADBKeyBoard commits) is typing, sending empties the text
  field, ``keyevent HOME`` sends the app to the background,
  ``keyevent ENDCALL`` ends a call;
- writes each app's real pid into ``state.json`` so ``pidof`` reports it.

Each app process has ``argv[0]`` = the package name (``pidof`` and the strace launcher
find it by that), ``comm`` = the last 15 characters of it (as Android), and drops to the
package's uid (``setgid``/``setuid``, supplementary group 3003 ``inet``) after loading
what it needs, so ``/proc/net/tcp`` shows its uid.  It is multi-threaded (a chat
connection with keep-alives, a command reader, one thread per media upload or call),
resolves names with its own DNS client through the phone's resolver (the AP's dnsmasq
from ``/etc/resolv.conf``), and talks TLS (Python ``ssl`` against the lab CA) or plain
TCP in the framing of :mod:`controller.lab.servers`; calls are UDP: a STUN binding
request, then RTP-like datagrams at 50 packets/s (video adds 30 larger ones per second).

Every socket an app opens is recorded in the lab's truth file (JSON lines, one
``open`` and one ``close`` event per socket) from ``getsockname()``/``getpeername()``
right after ``connect()`` -- never from strace or netstat.  Times are host clock
(``time.time()``), the clock of the AP capture.

The screens' resource ids follow the real apps where they are known (Signal's
``embedded_text_editor``, ``send_button``, ``attach_button``; WhatsApp's ``entry``,
``send``, ``input_attach_button``); the call buttons' ids and Telegram's (which has
almost none: it builds its views in code, so scenarios should use content-desc) are
assumptions.
"""

from __future__ import annotations

import argparse
import ctypes
import encodings.idna  # noqa: F401  (ssl needs it for server_hostname; loaded before setuid)
import json
import os
import random
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from controller.lab import toolbox_runtime as rt

REPO_ROOT = Path(__file__).resolve().parents[2]
SIGNAL, TELEGRAM, WHATSAPP = "org.thoughtcrime.securesms", "org.telegram.messenger", "com.whatsapp"
GMS, CHROME = "com.google.android.gms", "com.android.chrome"
BACKGROUND = (GMS, CHROME)
AID_INET = 3003
FRAME = struct.Struct("!II")
STUN_MAGIC = 0x2112A442


@dataclass(frozen=True)
class Endpoint:
    """Where an app connects: a DNS name (or literal address), port and transport."""

    host: str
    port: int
    transport: str  # "tls", "plain", "mtproto" (plain with a 64-byte header), "udp"


@dataclass(frozen=True)
class Profile:
    """How one simulated app talks: its servers and the shape of its traffic."""

    chat: Endpoint | None = None
    media: Endpoint | None = None
    relay: Endpoint | None = None
    keepalive_s: float = 10.0
    keepalive_bytes: tuple[int, int] = (30, 30)
    message_bytes: tuple[int, int] = (180, 700)
    web: tuple[Endpoint, ...] = ()
    web_every_s: tuple[float, float] = (8.0, 15.0)


PROFILES: dict[str, Profile] = {
    SIGNAL: Profile(
        chat=Endpoint("chat.signal.org", 443, "tls"),
        media=Endpoint("cdn2.signal.org", 443, "tls"),
        relay=Endpoint("turn3.voip.signal.org", 3478, "udp"),
        keepalive_s=8.0,
        keepalive_bytes=(40, 40),
        message_bytes=(250, 900),
    ),
    WHATSAPP: Profile(
        chat=Endpoint("g.whatsapp.net", 443, "plain"),
        media=Endpoint("mmg.whatsapp.net", 443, "tls"),
        relay=Endpoint("relay.whatsapp.net", 3478, "udp"),
        keepalive_s=6.0,
        keepalive_bytes=(12, 12),
        message_bytes=(120, 500),
    ),
    TELEGRAM: Profile(
        chat=Endpoint("2001:67c:4e8:f004::a|149.154.167.50", 443, "mtproto"),
        media=Endpoint("149.154.167.51", 443, "mtproto"),
        relay=Endpoint("91.108.56.130", 596, "udp"),
        keepalive_s=7.0,
        keepalive_bytes=(24, 56),
        message_bytes=(150, 600),
    ),
    GMS: Profile(chat=Endpoint("mtalk.google.com", 5228, "tls"), keepalive_s=9.0),
    CHROME: Profile(
        web=(Endpoint("www.google.com", 443, "tls"), Endpoint("www.wikipedia.org", 443, "tls")),
        web_every_s=(6.0, 14.0),
    ),
}

MEDIA_BYTES = 600_000
UPLOAD_PACING_S = 0.005
CALL_PPS = 50


# --------------------------------------------------------------------------- screens


@dataclass(frozen=True)
class Widget:
    """One tappable element of a simulated screen and the action a tap on it triggers."""

    cls: str
    bounds: tuple[int, int, int, int]
    action: str
    resource_id: str = ""
    text: str = ""
    content_desc: str = ""


def _widgets(package: str, screen: str, w: int, h: int) -> list[Widget]:
    p = package
    if screen == "call":
        ids = {SIGNAL: f"{p}:id/call_screen_end_call", WHATSAPP: f"{p}:id/end_call_button"}
        return [
            Widget("android.widget.TextView", (80, 300, w - 80, 420), "", text="Alice"),
            Widget(
                "android.widget.ImageView",
                (w // 2 - 110, h - 420, w // 2 + 110, h - 200),
                "hangup",
                resource_id=ids.get(p, ""),
                content_desc="End call",
            ),
        ]
    ids = {
        SIGNAL: {
            "title": f"{p}:id/conversation_title_view",
            "voice": f"{p}:id/menu_call_secure",
            "video": f"{p}:id/menu_video_secure",
            "editor": f"{p}:id/embedded_text_editor",
            "attach": f"{p}:id/attach_button",
            "send": f"{p}:id/send_button",
        },
        WHATSAPP: {
            "title": f"{p}:id/conversation_contact_name",
            "voice": f"{p}:id/menuitem_voice_call",
            "video": f"{p}:id/menuitem_video_call",
            "editor": f"{p}:id/entry",
            "attach": f"{p}:id/input_attach_button",
            "send": f"{p}:id/send",
        },
    }.get(p, {})
    editor_text = {SIGNAL: "Signal message", WHATSAPP: "Message", TELEGRAM: "Message"}
    return [
        Widget("android.widget.TextView", (160, 110, 620, 210), "", ids.get("title", ""), "Alice"),
        Widget(
            "android.widget.Button",
            (w - 300, 100, w - 170, 220),
            "call video",
            ids.get("video", ""),
            content_desc="Video call",
        ),
        Widget(
            "android.widget.Button",
            (w - 160, 100, w - 30, 220),
            "call audio",
            ids.get("voice", ""),
            content_desc="Voice call" if p != TELEGRAM else "Call",
        ),
        Widget(
            "android.widget.ImageButton",
            (20, h - 200, 140, h - 80),
            "media",
            ids.get("attach", ""),
            content_desc="Attach media"
            if p == TELEGRAM
            else "Add attachment"
            if p == SIGNAL
            else "Attach",
        ),
        Widget(
            "android.widget.EditText",
            (150, h - 200, w - 160, h - 80),
            "focus",
            ids.get("editor", ""),
            text=editor_text.get(p, "Message"),
        ),
        Widget(
            "android.widget.ImageButton",
            (w - 150, h - 200, w - 30, h - 80),
            "chat",
            ids.get("send", ""),
            content_desc="Send",
        ),
    ]


def screen_xml(package: str, screen: str, w: int = 1080, h: int = 2400) -> str:
    """The uiautomator dump of ``package``'s ``screen`` ("chat" or "call")."""
    nodes = [
        rt.make_node(
            x.cls,
            package,
            x.bounds,
            text=x.text,
            resource_id=x.resource_id,
            content_desc=x.content_desc,
            clickable=bool(x.action),
            index=i,
        )
        for i, x in enumerate(_widgets(package, screen, w, h))
    ]
    content = rt.make_node(
        "android.widget.FrameLayout",
        package,
        (0, 96, w, h),
        resource_id="android:id/content",
        children=nodes,
    )
    root = rt.make_node("android.widget.FrameLayout", package, (0, 0, w, h), children=[content])
    return rt.make_hierarchy([root])


def action_at(package: str, screen: str, x: float, y: float, w: int = 1080, h: int = 2400) -> str:
    """The action a tap at (x, y) triggers on ``package``'s ``screen`` ('' for none)."""
    for widget in _widgets(package, screen, w, h):
        x1, y1, x2, y2 = widget.bounds
        if widget.action and x1 <= x <= x2 and y1 <= y <= y2:
            return widget.action
    return ""


# --------------------------------------------------------------------------- app process


class Truth:
    """Appends one JSON line per socket event to the lab's truth file (an inherited fd)."""

    def __init__(self, fd: int, app: str, phone: str) -> None:
        self.fd = fd
        self.app = app
        self.phone = phone
        self.lock = threading.Lock()

    def record(
        self, event: str, proto: str, sock: socket.socket, host: str, **extra: Any
    ) -> dict[str, Any]:
        local = sock.getsockname()
        remote = sock.getpeername()
        line = {
            "event": event,
            "time": time.time(),
            "proto": proto,
            "local_ip": local[0],
            "local_port": local[1],
            "remote_ip": remote[0],
            "remote_port": remote[1],
            "app": self.app,
            "uid": os.getuid(),
            "pid": os.getpid(),
            "phone": self.phone,
            "host": host,
            **extra,
        }
        self.write(line)
        return line

    def write(self, line: dict[str, Any]) -> None:
        data = (json.dumps(line, sort_keys=True) + "\n").encode()
        with self.lock:
            os.write(self.fd, data)


def nameserver() -> str:
    """The phone's resolver from /etc/resolv.conf (the AP's dnsmasq)."""
    try:
        for line in Path("/etc/resolv.conf").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "nameserver":
                return parts[1]
    except OSError:
        pass
    return "127.0.0.1"


def dns_query(name: str, txid: int) -> bytes:
    """A DNS query for the A record of ``name`` (recursion desired)."""
    qname = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    return struct.pack("!HHHHHH", txid, 0x0100, 1, 0, 0, 0) + qname + struct.pack("!HH", 1, 1)


def parse_a_records(reply: bytes, txid: int) -> list[str]:
    """The IPv4 addresses in a DNS reply's answer section."""
    if len(reply) < 12:
        return []
    rid, _flags, qd, an, _ns, _ar = struct.unpack("!HHHHHH", reply[:12])
    if rid != txid:
        return []
    pos = 12

    def skip_name(pos: int) -> int:
        while pos < len(reply):
            n = reply[pos]
            if n == 0:
                return pos + 1
            if n & 0xC0 == 0xC0:
                return pos + 2
            pos += n + 1
        return pos

    for _ in range(qd):
        pos = skip_name(pos) + 4
    out = []
    for _ in range(an):
        pos = skip_name(pos)
        if pos + 10 > len(reply):
            break
        rtype, _cls, _ttl, rdlen = struct.unpack("!HHIH", reply[pos : pos + 10])
        pos += 10
        if rtype == 1 and rdlen == 4:
            out.append(socket.inet_ntoa(reply[pos : pos + 4]))
        pos += rdlen
    return out


class SimulatedApp:
    """One app process: a chat connection with keep-alives, media uploads, calls, browsing."""

    def __init__(self, package: str, truth: Truth, tls: ssl.SSLContext) -> None:
        self.package = package
        self.profile = PROFILES[package]
        self.truth = truth
        self.tls = tls
        self.stop = threading.Event()
        self.call_stop = threading.Event()
        self.call_thread: threading.Thread | None = None
        self.chat: socket.socket | None = None
        self.chat_lock = threading.Lock()
        self.open: dict[int, tuple[socket.socket, dict[str, Any]]] = {}
        self.open_lock = threading.Lock()
        self.dns_cache: dict[str, tuple[str, float]] = {}
        self.rng = random.Random(os.getpid())
        self.typed = 0

    # ---- sockets with truth

    def _opened(self, sock: socket.socket, proto: str, host: str, role: str) -> None:
        line = self.truth.record("open", proto, sock, host, role=role)
        with self.open_lock:
            self.open[id(sock)] = (sock, line)

    def _close(self, sock: socket.socket | None) -> None:
        if sock is None:
            return
        with self.open_lock:
            entry = self.open.pop(id(sock), None)
        if entry is not None:
            self.truth.write({**entry[1], "event": "close", "time": time.time()})
        try:
            sock.close()
        except OSError:
            pass

    def resolve(self, host: str) -> str:
        """The address of ``host``: literal, cached, or asked of the phone's resolver."""
        for family in (socket.AF_INET, socket.AF_INET6):
            try:
                socket.inet_pton(family, host)
                return host
            except OSError:
                pass
        cached = self.dns_cache.get(host)
        if cached and cached[1] > time.monotonic():
            return cached[0]
        for _attempt in range(3):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                sock.settimeout(2.0)
                sock.connect((nameserver(), 53))
                self._opened(sock, "udp", "dns", "dns")
                txid = self.rng.randrange(1, 65535)
                sock.send(dns_query(host, txid))
                answers = parse_a_records(sock.recv(2048), txid)
                if answers:
                    self.dns_cache[host] = (answers[0], time.monotonic() + 60)
                    return answers[0]
            except OSError:
                pass
            finally:
                self._close(sock)
        raise OSError(f"cannot resolve {host}")

    def connect(self, ep: Endpoint, role: str) -> socket.socket:
        """A connected TCP socket (TLS-wrapped when the endpoint says so), recorded in the truth."""
        raw = None
        hosts = ep.host.split("|")  # literal alternatives, IPv6 first (as Telegram's DC list)
        for i, host in enumerate(hosts):
            try:
                raw = socket.create_connection((self.resolve(host), ep.port), timeout=3.0)
                break
            except OSError:
                if i == len(hosts) - 1:
                    raise
        assert raw is not None
        self._opened(raw, "tcp", ep.host, role)
        try:
            if ep.transport == "tls":
                sock: socket.socket = self.tls.wrap_socket(raw, server_hostname=ep.host)
                with self.open_lock:
                    self.open[id(sock)] = (sock, self.open.pop(id(raw))[1])
            else:
                sock = raw
                if ep.transport == "mtproto":
                    sock.sendall(b"\xef" + os.urandom(63))
            sock.settimeout(10.0)
            return sock
        except BaseException:
            self._close(raw)
            raise

    @staticmethod
    def exchange(sock: socket.socket, size: int, reply: int) -> None:
        """Send one frame of ``size`` bytes and read the server's ``reply``-byte answer."""
        sock.sendall(FRAME.pack(size, reply) + os.urandom(size))
        if reply:
            need = FRAME.size + reply
            got = 0
            while got < need:
                chunk = sock.recv(min(65536, need - got))
                if not chunk:
                    raise ConnectionError("server closed")
                got += len(chunk)

    # ---- behaviours

    def chat_loop(self) -> None:
        """Keep the chat connection up with keep-alives; reconnect after a failure."""
        ep = self.profile.chat
        if ep is None:
            return
        while not self.stop.is_set():
            try:
                sock = self.connect(ep, "chat")
                with self.chat_lock:
                    self.chat = sock
                    self.exchange(sock, self.rng.randint(300, 600), self.rng.randint(800, 2000))
                while not self.stop.wait(self.profile.keepalive_s * self.rng.uniform(0.8, 1.2)):
                    lo, hi = self.profile.keepalive_bytes
                    with self.chat_lock:
                        self.exchange(sock, self.rng.randint(lo, hi), self.rng.randint(lo, hi))
            except OSError:
                pass
            with self.chat_lock:
                self._close(self.chat)
                self.chat = None
            self.stop.wait(1.0)

    def send_messages(self, count: int) -> None:
        """A chat burst: each message, its server ack, and a delivery receipt."""
        lo, hi = self.profile.message_bytes
        for _ in range(count):
            with self.chat_lock:
                if self.chat is None:
                    return
                try:
                    size = self.rng.randint(lo, hi) + self.typed
                    self.exchange(self.chat, size, self.rng.randint(60, 120))
                    self.exchange(self.chat, self.rng.randint(60, 90), self.rng.randint(90, 200))
                except OSError:
                    return
            self.typed = 0
            time.sleep(self.rng.uniform(0.05, 0.3))

    def typing(self) -> None:
        with self.chat_lock:
            if self.chat is not None:
                try:
                    self.exchange(self.chat, self.rng.randint(40, 70), 0)
                except OSError:
                    pass

    def upload(self, total: int) -> None:
        """A media upload on its own connection, in 16 KiB frames."""
        ep = self.profile.media
        if ep is None:
            return
        try:
            sock = self.connect(ep, "media")
        except OSError:
            return
        try:
            self.exchange(sock, self.rng.randint(400, 700), self.rng.randint(300, 600))
            sent = 0
            while sent < total and not self.stop.is_set():
                n = min(16384, total - sent)
                self.exchange(sock, n, 0)
                sent += n
                time.sleep(UPLOAD_PACING_S)  # a phone's uplink, not a veth's: ~3 MB/s
            self.exchange(sock, 64, self.rng.randint(200, 400))
        except OSError:
            pass
        finally:
            self._close(sock)

    def call(self, video: bool) -> None:
        """A call over UDP: STUN binding to the relay, then RTP-like packets both ways."""
        ep = self.profile.relay
        if ep is None:
            return
        try:
            ip = self.resolve(ep.host)
        except OSError:
            return
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.connect((ip, ep.port))
            txid = os.urandom(12)
            stun = struct.pack("!HHI", 0x0001, 0, STUN_MAGIC) + txid
            sock.send(stun)
            self._opened(sock, "udp", ep.host, "call-video" if video else "call-audio")
            sock.settimeout(0.5)
            for _ in range(3):
                try:
                    if sock.recv(2048)[8:20] == txid:
                        break
                except TimeoutError:
                    sock.send(stun)
            sock.setblocking(False)
            seq, ts = self.rng.randrange(65536), self.rng.randrange(1 << 32)
            ssrc = self.rng.randrange(1 << 32)
            tick = 1.0 / CALL_PPS
            nxt = time.monotonic()
            n = 0
            while not self.call_stop.is_set() and not self.stop.is_set():
                sizes = [self.rng.randint(70, 160)]
                if video and n % 5 < 3:
                    sizes.append(self.rng.randint(800, 1150))
                for size in sizes:
                    head = struct.pack("!BBHII", 0x80, 111, seq & 0xFFFF, ts & 0xFFFFFFFF, ssrc)
                    try:
                        sock.send(head + os.urandom(size))
                    except OSError:
                        pass
                    seq += 1
                ts += 960
                n += 1
                try:
                    while sock.recv(2048):
                        pass
                except (BlockingIOError, OSError):
                    pass
                nxt += tick
                self.call_stop.wait(max(0.0, nxt - time.monotonic()))
        except OSError:
            pass
        finally:
            self._close(sock)

    def browse_loop(self) -> None:
        """Chrome in the background: now and then a short HTTPS exchange with a web server."""
        if not self.profile.web:
            return
        lo, hi = self.profile.web_every_s
        delay = self.rng.uniform(0.5, 2.0)
        while not self.stop.wait(delay):
            self.browse_once()
            delay = self.rng.uniform(lo, hi)

    def browse_once(self) -> None:
        ep = self.rng.choice(self.profile.web)
        try:
            sock = self.connect(ep, "web")
        except OSError:
            return
        try:
            for _ in range(self.rng.randint(1, 3)):
                self.exchange(sock, self.rng.randint(300, 800), self.rng.randint(2000, 30000))
        except OSError:
            pass
        finally:
            self._close(sock)

    # ---- control

    def command(self, line: str) -> None:
        """Act on one command from the manager (``chat N``, ``media``, ``call audio`` ...)."""
        words = line.split()
        if not words:
            return
        verb = words[0]
        if verb == "chat":
            count = int(words[1]) if len(words) > 1 else 1
            threading.Thread(target=self.send_messages, args=(count,), daemon=True).start()
        elif verb == "typing":
            self.typed += int(words[1]) if len(words) > 1 else 0
            threading.Thread(target=self.typing, daemon=True).start()
        elif verb == "media":
            total = int(words[1]) if len(words) > 1 else MEDIA_BYTES
            threading.Thread(target=self.upload, args=(total,), daemon=True).start()
        elif verb == "call":
            if self.call_thread is not None and self.call_thread.is_alive():
                return
            self.call_stop.clear()
            video = len(words) > 1 and words[1] == "video"
            self.call_thread = threading.Thread(target=self.call, args=(video,), daemon=True)
            self.call_thread.start()
        elif verb == "hangup":
            self.call_stop.set()
        elif verb == "browse":
            threading.Thread(target=self.browse_once, daemon=True).start()
        elif verb == "quit":
            self.stop.set()

    def read_commands(self) -> None:
        for line in sys.stdin:
            self.command(line)
        self.stop.set()

    def run(self) -> None:
        threads = [
            threading.Thread(target=self.chat_loop, name="chat", daemon=True),
            threading.Thread(target=self.browse_loop, name="browse", daemon=True),
            threading.Thread(target=self.read_commands, name="control", daemon=True),
        ]
        for t in threads:
            t.start()
        self.stop.wait()
        self.call_stop.set()
        if self.call_thread is not None:
            self.call_thread.join(timeout=2)
        with self.open_lock:
            left = [s for s, _ in self.open.values()]
        for sock in left:
            self._close(sock)


def drop_privileges(uid: int) -> None:
    """Become the app's uid (as zygote does), keeping the process dumpable for root's strace."""
    os.setgroups([AID_INET])
    os.setgid(uid)
    os.setuid(uid)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(4, 1)  # PR_SET_DUMPABLE
    except (OSError, AttributeError):
        pass


def set_comm(name: str) -> None:
    """The kernel's process name: the last 15 characters of the package, as on Android."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(15, name[-15:].encode())  # PR_SET_NAME
    except (OSError, AttributeError):
        pass


def run_app(package: str, uid: int, truth_fd: int, ca: str, phone: str) -> int:
    """Body of one app process (started by the manager, as root, with argv[0] = package)."""
    set_comm(package)
    tls = ssl.create_default_context(cafile=ca)
    truth = Truth(truth_fd, package, phone)
    app = SimulatedApp(package, truth, tls)
    if os.geteuid() == 0 and uid:
        drop_privileges(uid)
    for signo in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signo, lambda *_: app.stop.set())
    app.run()
    return 0


# --------------------------------------------------------------------------- manager


@dataclass
class _Running:
    proc: subprocess.Popen[bytes]
    screen: str = "chat"
    stopping_since: float | None = None
    started: float = field(default_factory=time.monotonic)
    sidecar: subprocess.Popen[bytes] | None = None
    """A process of the app with a hostile name (``hostile_process`` failure mode)."""

    def kill_sidecar(self) -> None:
        if self.sidecar is not None and self.sidecar.poll() is None:
            self.sidecar.kill()
            self.sidecar.wait()


def hostile_name(package: str, kind: str) -> str:
    """argv[0] of a process strace's log naming must survive: 300 characters, or a newline."""
    return f"{package}:" + ("x" * 300 if kind == "long" else "evil\nname")


class Manager:
    """Starts, steers and stops one phone's simulated apps from its state and input log."""

    def __init__(self, state_dir: Path, truth_path: Path, ca: Path, interval: float = 0.05) -> None:
        self.state_dir = state_dir
        self.truth_path = truth_path
        self.ca = ca
        self.interval = interval
        self.apps: dict[str, _Running] = {}
        self.crashes: dict[str, int] = {}
        self.stop = threading.Event()
        self.input_offset = 0
        self.foreground: str | None = None
        state = rt.read_state(state_dir)
        self.serial = str(state.get("serial", ""))
        self.display = state.get("display", {"width": 1080, "height": 2400})
        self.truth_fd = os.open(truth_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        log = state_dir / rt.INPUT_LOG
        self.input_offset = log.stat().st_size if log.exists() else 0

    def _wh(self) -> tuple[int, int]:
        return int(self.display.get("width", 1080)), int(self.display.get("height", 2400))

    def publish_screens(self, packages: list[str]) -> None:
        w, h = self._wh()

        def put(s: dict[str, Any]) -> None:
            screens = s.setdefault("screens", {})
            for pkg in packages:
                running = self.apps.get(pkg)
                screens[pkg] = screen_xml(pkg, running.screen if running else "chat", w, h)

        rt.update_state(self.state_dir, put)

    def start_app(self, package: str, uid: int) -> None:
        argv = [
            package,
            "-m",
            "controller.lab.apps",
            "app",
            package,
            "--uid",
            str(uid),
            "--truth-fd",
            str(self.truth_fd),
            "--ca",
            str(self.ca),
            "--phone",
            self.serial,
        ]
        # argv[0] is the package name, so Python cannot find its home from it: name it.
        env = {
            "PYTHONPATH": str(REPO_ROOT),
            "PYTHONHOME": sys.base_prefix,
            "PYTHONDONTWRITEBYTECODE": "1",
            "PATH": "/usr/bin:/bin",
            "LANG": "C.UTF-8",
        }
        proc = subprocess.Popen(
            argv, executable=sys.executable, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
            stderr=open(self.state_dir / f"app-{package}.log", "ab"), pass_fds=(self.truth_fd,),
            env=env, cwd="/", start_new_session=True,
        )  # fmt: skip
        self.apps[package] = _Running(proc)
        hostile = rt.read_state(self.state_dir).get("faults", {}).get("hostile_process", "none")
        if hostile in ("long", "newline"):
            self.apps[package].sidecar = subprocess.Popen(
                [hostile_name(package, hostile), "-c",
                 f"import ctypes, os, time\nos.setgid({uid}); os.setuid({uid})\n"
                 "ctypes.CDLL(None).prctl(4, 1)  # PR_SET_DUMPABLE, as zygote's children\n"
                 "while True: time.sleep(60)"] if os.geteuid() == 0 and uid else
                [hostile_name(package, hostile), "-c", "import time\nwhile True: time.sleep(60)"],
                executable=sys.executable, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, env=env, cwd="/", start_new_session=True,
            )  # fmt: skip

        def record_pid(s: dict[str, Any]) -> None:
            entry = s.get("running", {}).get(package)
            if entry is not None:
                entry["pid"] = proc.pid

        rt.update_state(self.state_dir, record_pid)

    def send(self, package: str, line: str) -> None:
        running = self.apps.get(package)
        if running is None or running.proc.stdin is None or running.stopping_since is not None:
            return
        try:
            running.proc.stdin.write((line + "\n").encode())
            running.proc.stdin.flush()
        except OSError:
            pass

    def stop_app(self, package: str) -> None:
        running = self.apps.get(package)
        if running is None or running.stopping_since is not None:
            return
        running.stopping_since = time.monotonic()
        try:
            running.proc.terminate()
        except OSError:
            pass

    def reap(self) -> None:
        for package, running in list(self.apps.items()):
            if running.proc.poll() is not None:
                if running.proc.stdin is not None:
                    running.proc.stdin.close()
                del self.apps[package]
                running.kill_sidecar()
                if running.stopping_since is None:  # crashed: the next tick restarts it
                    self.crashes[package] = self.crashes.get(package, 0) + 1
            elif (
                running.stopping_since is not None and time.monotonic() - running.stopping_since > 3
            ):
                running.proc.kill()

    def on_input(self, event: dict[str, Any], state: dict[str, Any]) -> None:
        fg = (state.get("foreground") or {}).get("package")
        if fg not in self.apps:
            return
        running = self.apps[fg]
        kind, args = event.get("kind"), event.get("args", [])
        w, h = self._wh()
        if kind == "tap" and len(args) >= 2:
            action = action_at(fg, running.screen, float(args[0]), float(args[1]), w, h)
            if action == "chat":
                self.send(fg, "chat 1")
                rt.edit_focused(str(self.state_dir), lambda _text: "")  # the message is sent
            elif action == "media":
                self.send(fg, f"media {MEDIA_BYTES}")
            elif action.startswith("call"):
                self.send(fg, action)
                running.screen = "call"
                self.publish_screens([fg])
            elif action == "hangup":
                self.hangup(fg)
        elif kind == "text" and args:
            self.send(fg, f"typing {len(args[0])}")
        elif kind == "keyevent" and args and args[-1] in ("KEYCODE_ENDCALL", "6"):
            self.hangup(fg)
        elif kind == "keyevent" and args and args[-1] in ("KEYCODE_ENTER", "66"):
            self.send(fg, "chat 1")
            rt.edit_focused(str(self.state_dir), lambda _text: "")

    def hangup(self, package: str) -> None:
        self.send(package, "hangup")
        running = self.apps.get(package)
        if running is not None and running.screen != "chat":
            running.screen = "chat"
            self.publish_screens([package])

    def tick(self) -> None:
        state = rt.read_state(self.state_dir)
        packages = state.get("packages", {})
        wanted = [p for p in state.get("running", {}) if p in PROFILES and p in packages]
        wanted += [p for p in BACKGROUND if p in packages and p not in wanted]
        for package in wanted:
            if package not in self.apps:
                if self.crashes.get(package, 0) < 5:
                    self.start_app(package, int(packages[package]["uid"]))
                    if package not in BACKGROUND:
                        self.publish_screens([package])
                continue
            pid = self.apps[package].proc.pid
            if state.get("running", {}).get(package, {}).get("pid") not in (None, pid):

                def fix(s: dict[str, Any], package: str = package, pid: int = pid) -> None:
                    if package in s.get("running", {}):
                        s["running"][package]["pid"] = pid

                rt.update_state(self.state_dir, fix)
        for package in list(self.apps):
            if package not in wanted:
                self.stop_app(package)
        log = self.state_dir / rt.INPUT_LOG
        try:
            with open(log, "rb") as f:
                f.seek(self.input_offset)
                data = f.read()
        except OSError:
            data = b""
        if data:
            complete = data[: data.rfind(b"\n") + 1]
            self.input_offset += len(complete)
            for raw in complete.splitlines():
                try:
                    self.on_input(json.loads(raw), state)
                except (ValueError, TypeError):
                    continue
        self.reap()

    def run(self) -> None:
        launchable = [p for p in (SIGNAL, TELEGRAM, WHATSAPP)]
        self.publish_screens(launchable)
        while not self.stop.is_set():
            try:
                self.tick()
            except (OSError, ValueError) as exc:
                print(f"apps: {exc}", file=sys.stderr, flush=True)
            self.stop.wait(self.interval)
        for package in list(self.apps):
            self.stop_app(package)
        deadline = time.monotonic() + 3
        while self.apps and time.monotonic() < deadline:
            self.reap()
            time.sleep(0.05)
        for running in self.apps.values():
            running.proc.kill()
            running.proc.wait()
            running.kill_sidecar()


def main(argv: list[str] | None = None) -> int:
    """``python -m controller.lab.apps manager|app ...``."""
    parser = argparse.ArgumentParser(prog="python -m controller.lab.apps")
    sub = parser.add_subparsers(dest="what", required=True)
    m = sub.add_parser("manager", help="run one phone's app manager (root, in its namespace)")
    m.add_argument("--state-dir", required=True, type=Path)
    m.add_argument("--truth", required=True, type=Path)
    m.add_argument("--ca", required=True, type=Path)
    a = sub.add_parser("app", help="one app process (started by the manager)")
    a.add_argument("package")
    a.add_argument("--uid", type=int, default=0)
    a.add_argument("--truth-fd", type=int, required=True)
    a.add_argument("--ca", required=True)
    a.add_argument("--phone", default="")
    args = parser.parse_args(argv)
    if args.what == "app":
        return run_app(args.package, args.uid, args.truth_fd, args.ca, args.phone)
    manager = Manager(args.state_dir, args.truth, args.ca)
    for signo in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signo, lambda *_: manager.stop.set())
    print("managing", flush=True)
    manager.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
