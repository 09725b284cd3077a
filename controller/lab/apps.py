"""Simulated apps on a lab phone: real processes with real sockets, driven by ``am``/``input``.

One *app manager* runs per phone, as root inside the phone's network namespace
(``python -m controller.lab.apps manager --state-dir DIR --truth FILE --ca CA``).  It
watches the phone's ``state.json`` and ``input_events.jsonl`` (written by the toolbox
shims ``am``, ``input`` ...) and

- starts one process per package that ``am start`` marked running, and the always-on
  background apps (``com.google.android.gms``, ``com.android.chrome``); stops a process
  on ``am force-stop``;
- keeps each messenger's UI state (:mod:`controller.lab.app_ui`: the screens rebuilt from
  the real apps' layouts, in the phone's language from ``persist.sys.locale``) across
  sessions, publishes its screens (uiautomator XML) in the state and turns taps into
  moves and actions: open a chat, send a message (pending -> sent once the server took
  it -> delivered once the peer got it -> read), send a photo, place, answer, decline or
  end a call; ``input text`` (or text ADBKeyBoard commits) is typing, ``keyevent BACK``
  moves back (out of the app from its main screen), ``HOME`` sends the app to the
  background, ``am start`` returns to the last screen (a cold start after
  ``am force-stop`` to the main screen), ``keyevent ENDCALL`` ends a call;
- signals calls and messages to the other lab phones through the lab's relay directory
  (one inbox per phone owner): a call to another lab phone's owner rings that phone
  (its app comes to the front with the incoming-call screen), call media flows on both
  phones only once the callee answers, a hang-up on either side ends both, an unanswered
  call gives up after the ring timeout ("No answer"); a call to anybody else only rings;
- now and then (seeded, ``--interruptions`` per action) opens a permission prompt, a
  "what's new" sheet or a rating dialog on top; no other tap works until it is dismissed;
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

The screens' ids and strings are the real apps' (see :mod:`controller.lab.app_ui` and
``controller/scenarios/selectors.yaml``).
"""

from __future__ import annotations

import argparse
import ctypes
import encodings.idna  # noqa: F401  (ssl needs it for server_hostname; loaded before setuid)
import json
import os
import queue
import random
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from controller.lab import app_ui as ui
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
RING_TIMEOUT_S = 45.0  # how long an unanswered call rings before the caller gives up
ENDED_LINGER_S = ui.ENDED_LINGER_S


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
        self.ice_stop = threading.Event()
        self.ice_thread: threading.Thread | None = None
        self.chat: socket.socket | None = None
        self.chat_lock = threading.Lock()
        self.open: dict[int, tuple[socket.socket, dict[str, Any]]] = {}
        self.open_lock = threading.Lock()
        self.dns_cache: dict[str, tuple[str, float]] = {}
        self.rng = random.Random(os.getpid())
        self.typed = 0
        self.out_lock = threading.Lock()

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

    def report(self, line: str) -> None:
        """Tell the manager (our stdout) what happened: ``sent MID`` once the server took it."""
        with self.out_lock:
            try:
                sys.stdout.write(line + "\n")
                sys.stdout.flush()
            except (OSError, ValueError):
                pass

    def send_messages(self, count: int, mid: str = "", extra: int = 0) -> None:
        """A chat burst: each message, its server ack, and a delivery receipt.

        Without a chat connection the message waits (pending) and is retried for 30 s.
        """
        lo, hi = self.profile.message_bytes
        deadline = time.monotonic() + 30
        sent = 0
        while sent < count and not self.stop.is_set():
            with self.chat_lock:
                chat = self.chat
                if chat is not None:
                    try:
                        size = self.rng.randint(lo, hi) + self.typed + extra
                        self.exchange(chat, size, self.rng.randint(60, 120))
                        self.exchange(chat, self.rng.randint(60, 90), self.rng.randint(90, 200))
                        sent += 1
                        self.typed = 0
                    except OSError:
                        chat = None
            if chat is None:
                if time.monotonic() > deadline:
                    return
                self.stop.wait(0.5)
                continue
            time.sleep(self.rng.uniform(0.05, 0.3))
        if mid and sent == count:
            self.report(f"sent {mid}")

    def chat_exchange(self, up: tuple[int, int], down: tuple[int, int], times: int = 1) -> None:
        """Small exchanges on the chat connection (call signalling, an incoming message)."""
        for _ in range(times):
            with self.chat_lock:
                if self.chat is None:
                    return
                try:
                    self.exchange(self.chat, self.rng.randint(*up), self.rng.randint(*down))
                except OSError:
                    return
            time.sleep(self.rng.uniform(0.05, 0.2))

    def typing(self) -> None:
        with self.chat_lock:
            if self.chat is not None:
                try:
                    self.exchange(self.chat, self.rng.randint(40, 70), 0)
                except OSError:
                    pass

    def upload(self, total: int, mid: str = "") -> None:
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
            return
        finally:
            self._close(sock)
        if mid:
            self.send_messages(1, mid)  # the message carrying the attachment's pointer

    def _relay_socket(self) -> tuple[socket.socket, str] | None:
        """A UDP socket connected to the app's call relay (and the relay's name), or None
        when the app has no relay or it cannot be resolved or reached."""
        ep = self.profile.relay
        if ep is None:
            return None
        try:
            ip = self.resolve(ep.host)
        except OSError:
            return None
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.connect((ip, ep.port))
        except OSError:
            sock.close()
            return None
        return sock, ep.host

    def ice(self) -> None:
        """A call being set up: STUN bindings to the relay (candidate gathering, consent
        checks) every 2 s while it rings -- no media until the callee answers."""
        got = self._relay_socket()
        if got is None:
            return
        sock, host = got
        try:
            self._opened(sock, "udp", host, "ice")
            sock.settimeout(0.5)
            while not self.ice_stop.is_set() and not self.stop.is_set():
                txid = os.urandom(12)
                sock.send(struct.pack("!HHI", 0x0001, 0, STUN_MAGIC) + txid)
                try:
                    sock.recv(2048)
                except (TimeoutError, OSError):
                    pass
                self.ice_stop.wait(2.0)
        except OSError:
            pass
        finally:
            self._close(sock)

    def call(self, video: bool) -> None:
        """A call over UDP: STUN binding to the relay, then RTP-like packets both ways."""
        got = self._relay_socket()
        if got is None:
            return
        sock, host = got
        try:
            txid = os.urandom(12)
            stun = struct.pack("!HHI", 0x0001, 0, STUN_MAGIC) + txid
            sock.send(stun)
            self._opened(sock, "udp", host, "call-video" if video else "call-audio")
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
            mid = words[2] if len(words) > 2 else ""
            extra = int(words[3]) if len(words) > 3 else 0
            threading.Thread(target=self.send_messages, args=(count, mid, extra),
                             daemon=True).start()  # fmt: skip
        elif verb == "signal":  # call set-up, ringing, answer, hang-up: a few small frames
            times = int(words[1]) if len(words) > 1 else 2
            threading.Thread(target=self.chat_exchange, args=((120, 400), (80, 300), times),
                             daemon=True).start()  # fmt: skip
        elif verb == "recv":  # an incoming message pushed down the chat connection
            size = int(words[1]) if len(words) > 1 else 400
            threading.Thread(target=self.chat_exchange, args=((40, 80), (size, size + 200)),
                             daemon=True).start()  # fmt: skip
        elif verb == "typing":
            self.typed += int(words[1]) if len(words) > 1 else 0
            threading.Thread(target=self.typing, daemon=True).start()
        elif verb == "media":
            total = int(words[1]) if len(words) > 1 else MEDIA_BYTES
            mid = words[2] if len(words) > 2 else ""
            threading.Thread(target=self.upload, args=(total, mid), daemon=True).start()
        elif verb == "ice":
            if self.ice_thread is not None and self.ice_thread.is_alive():
                return
            self.ice_stop.clear()
            self.ice_thread = threading.Thread(target=self.ice, daemon=True)
            self.ice_thread.start()
        elif verb == "call":
            self.ice_stop.set()
            if self.call_thread is not None and self.call_thread.is_alive():
                return
            self.call_stop.clear()
            video = len(words) > 1 and words[1] == "video"
            self.call_thread = threading.Thread(target=self.call, args=(video,), daemon=True)
            self.call_thread.start()
        elif verb == "hangup":
            self.call_stop.set()
            self.ice_stop.set()
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


@dataclass
class ManagerOptions:
    """One phone's app manager: who owns the phone, whom it knows, how its apps behave."""

    owner: str = ""
    contacts: list[str] = field(default_factory=list)
    relay: Path | None = None  # the lab's relay directory: one inbox per phone owner
    ring_timeout_s: float = RING_TIMEOUT_S
    interruption_rate: float = 0.0
    seed: int | None = None


class Relay:
    """The lab's call and message signalling between phones: one inbox directory per owner.

    A post is one JSON file, written aside and renamed into the peer's inbox; every
    manager polls its own inbox.  A contact is a lab phone when it has an inbox.
    """

    def __init__(self, root: Path | None, owner: str) -> None:
        self.root = root
        self.owner = owner
        self.n = 0
        if root is not None and owner:
            (root / owner).mkdir(parents=True, exist_ok=True)
            (root / ".tmp").mkdir(parents=True, exist_ok=True)

    def is_phone(self, name: str) -> bool:
        return bool(self.root is not None and name and name != self.owner
                    and (self.root / name).is_dir())  # fmt: skip

    def post(self, to: str, message: dict[str, Any]) -> bool:
        if not self.is_phone(to) or self.root is None:
            return False
        self.n += 1
        name = f"{time.time_ns()}-{os.getpid()}-{self.n}.json"
        tmp = self.root / ".tmp" / name
        tmp.write_text(json.dumps({**message, "from": self.owner}))
        os.chmod(tmp, 0o644)
        os.replace(tmp, self.root / to / name)
        return True

    def receive(self) -> list[dict[str, Any]]:
        if self.root is None or not self.owner:
            return []
        inbox = self.root / self.owner
        out = []
        try:
            names = sorted(os.listdir(inbox))
        except OSError:
            return []
        for name in names:
            path = inbox / name
            try:
                out.append(json.loads(path.read_text()))
            except (OSError, ValueError):
                pass
            try:
                path.unlink()
            except OSError:
                pass
        return out


class Manager:
    """Starts, steers and stops one phone's simulated apps from its state and input log.

    It keeps each messenger's UI state (:mod:`controller.lab.app_ui`) across sessions,
    publishes its screens, turns taps into moves and actions, signals calls and messages
    to the other lab phones through the :class:`Relay`, and now and then opens an
    interruption (a permission prompt or a rating dialog) on top.
    """

    def __init__(self, state_dir: Path, truth_path: Path, ca: Path, interval: float = 0.05,
                 options: ManagerOptions | None = None) -> None:  # fmt: skip
        self.state_dir = state_dir
        self.truth_path = truth_path
        self.ca = ca
        self.interval = interval
        self.opt = options or ManagerOptions()
        self.apps: dict[str, _Running] = {}
        self.crashes: dict[str, int] = {}
        self.stop = threading.Event()
        self.input_offset = 0
        state = rt.read_state(state_dir)
        self.serial = str(state.get("serial", ""))
        self.display = state.get("display", {"width": 1080, "height": 2400})
        self.truth_fd = os.open(truth_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        log = state_dir / rt.INPUT_LOG
        self.input_offset = log.stat().st_size if log.exists() else 0
        saved = state.get("app_ui") or {}
        self.ui: dict[str, dict[str, Any]] = {
            p: ui.cold_start(saved.get(p) or {}) for p in ui.MESSENGERS
        }
        if SIGNAL not in saved and self.opt.interruption_rate > 0:
            self.ui[SIGNAL]["media_allowed"] = False  # a fresh phone: Signal asks for photos
        self.relay = Relay(self.opt.relay, self.opt.owner)
        seed = self.opt.seed if self.opt.seed is not None else zlib.crc32(self.serial.encode())
        self.rng = random.Random(seed)
        self.outbox: queue.Queue[tuple[str, str]] = queue.Queue()
        self.later: list[tuple[float, str, str, str]] = []  # (due, package, contact, mid)
        self.published: dict[str, str] = {}
        self.saved_ui = ""
        self.rendered_for: tuple[Any, ...] = ()
        self.foreground_seen: tuple[Any, Any] | None = None
        self.mid = 0
        self.lang = "en"

        def contacts_of(s: dict[str, Any]) -> None:
            s["owner"] = self.opt.owner
            s["contacts"] = list(self.opt.contacts)

        rt.update_state(state_dir, contacts_of)

    def _wh(self) -> tuple[int, int]:
        return int(self.display.get("width", 1080)), int(self.display.get("height", 2400))

    # ---- screens

    def view(self, package: str, state: dict[str, Any]) -> ui.View:
        w, h = self._wh()
        field_ = (state.get("text_fields") or {}).get(package)
        return ui.View(package, self.lang, list(self.opt.contacts), w, h, time.time(), field_)

    def windows(self, package: str, state: dict[str, Any]) -> list[tuple[ui.Node, str]]:
        return ui.render(self.ui[package], self.view(package, state))

    def publish(self, state: dict[str, Any]) -> None:
        """Publish every messenger's screen (and the UI states) when something changed."""
        props = state.get("props") or {}
        self.lang = ui.language(props.get("persist.sys.locale") or props.get("ro.product.locale"))
        saved = json.dumps(self.ui, sort_keys=True)
        timer = any((u.get("call") or {}).get("state") == "connected" for u in self.ui.values())
        key = (saved, json.dumps(state.get("text_fields"), sort_keys=True), self.lang,
               int(time.time()) if timer else 0)  # fmt: skip
        if key == self.rendered_for:  # nothing a screen shows has changed
            return
        self.rendered_for = key
        changed = {}
        for package in ui.MESSENGERS:
            xml = ui.document(self.windows(package, state))
            if self.published.get(package) != xml:
                changed[package] = xml
        if not changed and saved == self.saved_ui:
            return

        def put(s: dict[str, Any]) -> None:
            s.setdefault("screens", {}).update(changed)
            s["app_ui"] = json.loads(saved)

        rt.update_state(self.state_dir, put)
        self.published.update(changed)
        self.saved_ui = saved

    # ---- processes

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
            argv, executable=sys.executable, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
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
        if package in self.ui:
            self.ui[package] = ui.cold_start(self.ui[package], keep_call=True)
        threading.Thread(target=self._read_reports, args=(package, proc), daemon=True).start()

        def record_pid(s: dict[str, Any]) -> None:
            entry = s.get("running", {}).get(package)
            if entry is not None:
                entry["pid"] = proc.pid

        rt.update_state(self.state_dir, record_pid)

    def _read_reports(self, package: str, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            self.outbox.put((package, raw.decode(errors="replace").strip()))

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
        if package in self.ui:  # force-stop: a call ends, the next start is a cold one
            if self.ui[package].get("call"):
                self.end_call(package, "call_ended", linger=False)
            self.ui[package] = ui.cold_start(self.ui[package])
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

    def bring_to_front(self, package: str) -> None:
        """An incoming call: the app starts if needed and its call screen comes to the front."""

        def front(s: dict[str, Any]) -> None:
            info = s.get("packages", {}).get(package)
            if info is None:
                return
            running = s.setdefault("running", {})
            now = rt.device_time(s)
            if package not in running:
                pid = int(s.get("next_pid", 20000))
                s["next_pid"] = pid + 7
                running[package] = {"pid": pid, "started_at": now}
            activity = str(info.get("activity") or f"{package}.MainActivity")
            running[package]["activity"] = activity
            s["foreground"] = {"package": package, "activity": activity, "since": now}

        rt.update_state(self.state_dir, front)

    # ---- interruptions

    def maybe_interrupt(self, package: str) -> None:
        rate = self.opt.interruption_rate
        state = self.ui[package]
        if rate <= 0 or state.get("dialog") or self.rng.random() >= rate:
            return
        what = self.rng.choice(ui.INTERRUPTIONS)
        if what in ("notifications", "microphone"):
            state["dialog"] = {"kind": "permission", "what": what}
        else:
            state["dialog"] = {"kind": what}

    # ---- actions

    def new_id(self) -> str:
        self.mid += 1
        return f"{self.opt.owner or self.serial}-{time.time_ns() % 10**12}-{self.mid}"

    def send_text(self, package: str, text: str, state: dict[str, Any]) -> None:
        contact = str(self.ui[package].get("contact") or "")
        if not contact:
            return
        mid = self.new_id()
        self.ui[package].setdefault("convs", {}).setdefault(contact, []).append(
            {"id": mid, "text": text, "out": True, "status": "pending", "t": time.time()}
        )
        self.send(package, f"chat 1 {mid} {len(text.encode())}")
        if (state.get("foreground") or {}).get("package") == package:
            rt.edit_focused(str(self.state_dir), lambda _old: "")  # the composer empties

    def send_media(self, package: str) -> None:
        contact = str(self.ui[package].get("contact") or "")
        if not contact:
            return
        mid = self.new_id()
        self.ui[package].setdefault("convs", {}).setdefault(contact, []).append(
            {
                "id": mid,
                "text": "",
                "media": True,
                "out": True,
                "status": "pending",
                "t": time.time(),
            }  # fmt: skip
        )
        self.send(package, f"media {MEDIA_BYTES} {mid}")

    def message_sent(self, package: str, mid: str) -> None:
        """The server took message ``mid``: sent; then to the peer (a lab phone) or delivered."""
        for contact, msgs in self.ui[package].get("convs", {}).items():
            for m in msgs:
                if m.get("id") == mid and m.get("out"):
                    if m.get("status") == "pending":
                        m["status"] = "sent"
                    post = {"kind": "msg", "app": package, "id": mid, "text": m.get("text", ""),
                            "media": bool(m.get("media"))}  # fmt: skip
                    if not self.relay.post(contact, post):  # someone else's phone, online
                        due = time.monotonic() + self.rng.uniform(0.4, 1.2)
                        self.later.append((due, package, contact, mid))
                    return

    def set_status(self, package: str, contact: str, mid: str, status: str) -> None:
        order = ["pending", "sent", "delivered", "read"]
        for m in self.ui[package].get("convs", {}).get(contact, []):
            if m.get("id") == mid and order.index(status) > order.index(m.get("status", "pending")):
                m["status"] = status

    def read_open_conversation(self, package: str, state: dict[str, Any]) -> None:
        """Messages on screen count as read (the sender's bubble shows it)."""
        u = self.ui[package]
        if (state.get("foreground") or {}).get("package") != package:
            return
        if u.get("screen") != "conversation" or u.get("call") or u.get("dialog"):
            return
        contact = str(u.get("contact") or "")
        for m in u.get("convs", {}).get(contact, []):
            if not m.get("out") and not m.get("read"):
                m["read"] = True
                self.relay.post(contact, {"kind": "read", "app": package, "id": m.get("id")})

    def place_call(self, package: str, contact: str, kind: str) -> None:
        if not contact:
            return
        u = self.ui[package]
        call_id = self.new_id()
        u["call"] = {"id": call_id, "peer": contact, "video": kind == "video", "dir": "out",
                     "state": "calling", "since": time.time(), "mono": time.monotonic(),
                     "return_to": u.get("screen")}  # fmt: skip
        u["dialog"] = None
        u["call_log"] = [c for c in u.get("call_log", []) if c != contact] + [contact]
        self.send(package, "signal 2")
        self.send(package, "ice")
        if not self.relay.post(contact, {"kind": "call", "app": package, "id": call_id,
                                         "video": kind == "video"}):  # fmt: skip
            u["call"]["ring_at"] = time.monotonic() + 1.0  # somebody's phone rings, unanswered

    def answer(self, package: str) -> None:
        call = self.ui[package].get("call")
        if not call or call.get("state") != "incoming":
            return
        call.update(state="connected", connected_at=time.time())
        self.send(package, "signal 1")
        self.send(package, "call video" if call.get("video") else "call audio")
        self.relay.post(str(call.get("peer")), {"kind": "answer", "app": package,
                                                "id": call.get("id")})  # fmt: skip

    def end_call(self, package: str, reason: str, notify: bool = True, linger: bool = True,
                 peer_reason: str = "call_ended") -> None:  # fmt: skip
        u = self.ui[package]
        call = u.get("call")
        if not call or call.get("state") == "ended":
            return
        self.send(package, "hangup")  # media, or the set-up's STUN checks
        self.send(package, "signal 1")
        if notify:
            self.relay.post(str(call.get("peer")), {"kind": "hangup", "app": package,
                                                    "id": call.get("id"), "reason": peer_reason})  # fmt: skip
        call.update(state="ended", reason=reason, ended_mono=time.monotonic())
        if not linger:
            self.close_call(package)

    def close_call(self, package: str) -> None:
        u = self.ui[package]
        call = u.get("call") or {}
        back_to = call.get("return_to") or ui.HOME_SCREEN
        u["call"] = None
        u["screen"] = back_to if back_to in ui.PARENT else ui.HOME_SCREEN
        if u["screen"] in ("chat_list", "calls_tab"):
            u["contact"] = None

    def do(self, package: str, effects: list[tuple[str, ...]], state: dict[str, Any]) -> None:
        for effect in effects:
            what = effect[0]
            if what == "send_text":
                self.send_text(package, effect[1], state)
            elif what == "send_media":
                self.send_media(package)
            elif what == "call":
                self.place_call(package, effect[1], effect[2])
            elif what == "hangup":
                call = self.ui[package].get("call") or {}
                if call.get("dir") == "out" and call.get("state") in ("calling", "ringing"):
                    self.end_call(package, "call_ended", peer_reason="no_answer")
                else:
                    self.end_call(package, "call_ended")
            elif what == "answer":
                self.answer(package)
            elif what == "decline":
                self.end_call(package, "call_ended", peer_reason="declined")

    # ---- events

    def on_input(self, event: dict[str, Any], state: dict[str, Any]) -> None:
        fg = (state.get("foreground") or {}).get("package")
        if fg not in self.ui or fg not in self.apps:
            return
        u = self.ui[fg]
        kind, args = event.get("kind"), event.get("args", [])
        if kind == "tap" and len(args) >= 2:
            action, arg = ui.hit(self.windows(fg, state), float(args[0]), float(args[1]))
            if not action:
                return
            dismissing = bool(u.get("dialog"))
            before = u.get("screen")
            text = ui.typed_text(u, self.view(fg, state))
            self.do(fg, ui.apply(u, fg, action, arg, text), state)
            if u.get("screen") in ui.AUTOFOCUS and u.get("screen") != before:
                self.focus_search(fg, state)
            if not dismissing and action not in ("noop", "focus"):
                self.maybe_interrupt(fg)
        elif kind == "text" and args:
            self.send(fg, f"typing {len(args[0])}")
        elif kind == "keyevent" and args:
            key = args[-1]
            if key in ("KEYCODE_BACK", "4"):
                if not ui.back(u, fg):
                    self.to_background(fg)
            elif key in ("KEYCODE_ENDCALL", "6") and u.get("call"):
                self.do(fg, [("hangup",)], state)
            elif key in ("KEYCODE_ENTER", "66") and u.get("screen") == "conversation":
                text = ui.typed_text(u, self.view(fg, state))
                if text and not u.get("dialog") and not u.get("call"):
                    self.send_text(fg, text, state)

    def focus_search(self, package: str, state: dict[str, Any]) -> None:
        """A search screen opens with its field focused (the keyboard up): typing goes there."""
        for root, _pkg in self.windows(package, state)[:1]:
            for node in root.walk():
                if "EditText" in node.cls:
                    x1, y1, x2, y2 = node.bounds
                    rid = node.rid if ":" in node.rid else f"{package}:id/{node.rid}"
                    field_ = {"resource_id": rid if node.rid else "", "text": "",
                              "bounds": f"[{x1},{y1}][{x2},{y2}]"}  # fmt: skip

                    def focus(s: dict[str, Any], f: dict[str, Any] = field_) -> None:
                        s.setdefault("text_fields", {})[package] = f

                    rt.update_state(self.state_dir, focus)
                    return

    def to_background(self, package: str) -> None:
        def leave(s: dict[str, Any]) -> None:
            if (s.get("foreground") or {}).get("package") == package:
                s["foreground"] = None

        rt.update_state(self.state_dir, leave)

    def on_post(self, post: dict[str, Any], state: dict[str, Any]) -> None:
        package = str(post.get("app") or "")
        if package not in self.ui:
            return
        u = self.ui[package]
        kind, peer, pid = post.get("kind"), str(post.get("from") or ""), post.get("id")
        call = u.get("call") or {}
        same = call.get("id") == pid and call.get("peer") == peer
        if kind == "msg":
            msgs = u.setdefault("convs", {}).setdefault(peer, [])
            if not any(m.get("id") == pid for m in msgs):
                msgs.append({"id": pid, "text": post.get("text", ""), "media": post.get("media"),
                             "out": False, "t": time.time()})  # fmt: skip
                self.send(package, f"recv {MEDIA_BYTES // 20 if post.get('media') else 500}")
            self.relay.post(peer, {"kind": "delivered", "app": package, "id": pid})
        elif kind in ("delivered", "read"):
            self.set_status(package, peer, str(pid), str(kind))
        elif kind == "call":
            if call and call.get("state") != "ended":
                self.relay.post(peer, {"kind": "busy", "app": package, "id": pid})
                return
            if call:
                self.close_call(package)
            u["call"] = {"id": pid, "peer": peer, "video": bool(post.get("video")), "dir": "in",
                         "state": "incoming", "since": time.time(), "mono": time.monotonic(),
                         "return_to": u.get("screen")}  # fmt: skip
            u["dialog"] = None
            u["call_log"] = [c for c in u.get("call_log", []) if c != peer] + [peer]
            self.bring_to_front(package)
            self.relay.post(peer, {"kind": "ringing", "app": package, "id": pid})
        elif kind == "ringing" and same and call.get("state") == "calling":
            call["state"] = "ringing"
        elif kind == "answer" and same and call.get("state") in ("calling", "ringing"):
            call.update(state="connected", connected_at=time.time())
            self.send(package, "call video" if call.get("video") else "call audio")
        elif kind in ("busy", "hangup") and same:
            reason = "busy" if kind == "busy" else str(post.get("reason") or "call_ended")
            if call.get("dir") == "in" or reason not in ui.STRINGS[package]["en"]:
                reason = "call_ended"
            self.end_call(package, reason, notify=False)

    def timers(self) -> None:
        now = time.monotonic()
        for package, u in self.ui.items():
            call = u.get("call")
            if not call:
                continue
            state = call.get("state")
            if state == "calling" and call.get("ring_at") and now >= call["ring_at"]:
                call["state"] = "ringing"
            if call.get("dir") == "out" and state in ("calling", "ringing"):
                if now - float(call.get("mono") or now) > self.opt.ring_timeout_s:
                    self.end_call(package, "no_answer", peer_reason="call_ended")
            elif state == "incoming" and now - float(call.get("mono") or now) > (
                self.opt.ring_timeout_s + 5
            ):  # the caller vanished
                self.end_call(package, "call_ended", notify=False)
            elif state == "ended" and now - float(call.get("ended_mono") or now) > ENDED_LINGER_S:
                self.close_call(package)
        due = [x for x in self.later if x[0] <= now]
        self.later = [x for x in self.later if x[0] > now]
        for _, package, contact, mid in due:
            self.set_status(package, contact, mid, "delivered")

    def tick(self) -> None:
        state = rt.read_state(self.state_dir)
        packages = state.get("packages", {})
        wanted = [p for p in state.get("running", {}) if p in PROFILES and p in packages]
        wanted += [p for p in BACKGROUND if p in packages and p not in wanted]
        for package in wanted:
            if package not in self.apps:
                if self.crashes.get(package, 0) < 5:
                    self.start_app(package, int(packages[package]["uid"]))
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
        fg = state.get("foreground") or {}
        seen = (fg.get("package"), fg.get("since"))
        if seen != self.foreground_seen:
            if self.foreground_seen is not None and fg.get("package") in self.ui:
                self.maybe_interrupt(str(fg.get("package")))  # a launch: "what's new", prompts
            self.foreground_seen = seen
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
                state = rt.read_state(self.state_dir)
        for post in self.relay.receive():
            self.on_post(post, state)
        while True:
            try:
                package, line = self.outbox.get_nowait()
            except queue.Empty:
                break
            words = line.split()
            if len(words) == 2 and words[0] == "sent" and package in self.ui:
                self.message_sent(package, words[1])
        self.timers()
        state = rt.read_state(self.state_dir)
        for package in ui.MESSENGERS:
            self.read_open_conversation(package, state)
        self.publish(state)
        self.reap()

    def run(self) -> None:
        self.publish(rt.read_state(self.state_dir))
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
    m.add_argument("--owner", default="", help="the phone owner's display name")
    m.add_argument("--contact", action="append", default=[], help="a contact's name (repeat)")
    m.add_argument("--relay", type=Path, help="the lab's relay directory (calls, messages)")
    m.add_argument("--ring-timeout", type=float, default=RING_TIMEOUT_S)
    m.add_argument(
        "--interruptions",
        type=float,
        default=0.0,
        help="chance of a permission prompt or rating dialog per action",
    )
    a = sub.add_parser("app", help="one app process (started by the manager)")
    a.add_argument("package")
    a.add_argument("--uid", type=int, default=0)
    a.add_argument("--truth-fd", type=int, required=True)
    a.add_argument("--ca", required=True)
    a.add_argument("--phone", default="")
    args = parser.parse_args(argv)
    if args.what == "app":
        return run_app(args.package, args.uid, args.truth_fd, args.ca, args.phone)
    options = ManagerOptions(owner=args.owner, contacts=args.contact, relay=args.relay,
                             ring_timeout_s=args.ring_timeout,
                             interruption_rate=args.interruptions)  # fmt: skip
    manager = Manager(args.state_dir, args.truth, args.ca, options=options)
    for signo in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signo, lambda *_: manager.stop.set())
    print("managing", flush=True)
    manager.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
