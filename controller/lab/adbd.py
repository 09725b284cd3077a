"""An emulated adbd: the device side of the ADB wire protocol over TCP.

The real adb server attaches to it with ``adb connect HOST:PORT`` and from then on sees
an ordinary device.  References: AOSP ``adb/protocol.txt`` (messages, CNXN, streams),
``SERVICES.TXT`` (``shell:``, ``exec:``, ``sync:``, ``root:``...), ``SYNC.TXT`` and
``file_sync_protocol.h`` (the sync sub-protocol), ``shell_protocol.h`` (shell v2).

Every message is a 24-byte little-endian header (command, arg0, arg1, data_length,
data_crc32, magic = command ^ 0xffffffff) followed by ``data_length`` bytes.  The
"crc32" is really the byte sum of the payload; from protocol version 0x01000001 on
neither side computes nor checks it.  This adbd answers CNXN directly, without the AUTH
exchange (as an adbd with ``ro.adb.secure=0``; the real adb server accepts that), then
serves one service per stream the host OPENs, one WRTE in flight per stream:

- ``shell:CMD`` (stdout and stderr merged), ``shell,v2[,raw]:CMD`` (shell protocol with
  stderr and exit status), ``...pty:`` and an interactive ``shell:`` on a pseudo-terminal,
  ``exec:CMD`` (stdout only); commands run through the phone's ``Toolbox``;
- ``sync:`` with STAT/STA2/LST2, LIST/LIS2, SEND/SND2, RECV/RCV2 (no compression), QUIT;
  only the phone's own tree (/data, /sdcard, /storage) is writable;
- ``tcp:PORT[:HOST]`` (for ``adb forward``), connecting from adbd's own network
  namespace (run adbd inside the phone's namespace for the phone's view);
- ``root:``, ``unroot:``, ``reboot:`` answer politely and change nothing.

Run one per phone namespace::

    ip netns exec phone1 python -m controller.lab.adbd --config phone1.yaml --port 5555
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import enum
import fcntl
import logging
import os
import pty
import re
import shutil
import signal
import stat
import struct
import sys
import tempfile
import termios
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from controller.errors import ControllerError, LabError
from controller.lab.toolbox import (
    PRESETS,
    PhoneConfig,
    Toolbox,
    die_with_parent,
    load_phone_config,
)

log = logging.getLogger(__name__)

A_VERSION_MIN = 0x01000000
A_VERSION_SKIP_CHECKSUM = 0x01000001
A_VERSION = 0x01000001
MAX_PAYLOAD_V1 = 4 * 1024
MAX_PAYLOAD = 1024 * 1024
SYNC_DATA_MAX = 64 * 1024
HANDSHAKE_TIMEOUT_S = 30.0
HEADER = struct.Struct("<6I")

FEATURES = [
    "shell_v2",
    "cmd",
    "stat_v2",
    "ls_v2",
    "fixed_push_mkdir",
    "fixed_push_symlink_timestamp",
    "sendrecv_v2",
]


class Command(enum.IntEnum):
    """ADB message commands (four ASCII bytes read as a little-endian u32)."""

    SYNC = 0x434E5953
    CNXN = 0x4E584E43
    AUTH = 0x48545541
    OPEN = 0x4E45504F
    OKAY = 0x59414B4F
    CLSE = 0x45534C43
    WRTE = 0x45545257
    STLS = 0x534C5453


class ShellId(enum.IntEnum):
    """Packet ids of the shell v2 protocol (``shell_protocol.h``)."""

    STDIN = 0
    STDOUT = 1
    STDERR = 2
    EXIT = 3
    CLOSE_STDIN = 4
    WINDOW_SIZE_CHANGE = 5
    INVALID = 255


class ProtocolError(Exception):
    """The peer sent something that is not ADB; its connection is dropped."""


@dataclass(slots=True)
class Message:
    """One ADB message."""

    command: int
    arg0: int
    arg1: int
    data: bytes = b""


def checksum(data: bytes) -> int:
    """The legacy ``data_crc32``: the sum of the payload bytes."""
    return sum(data) & 0xFFFFFFFF


def encode_message(msg: Message, with_checksum: bool) -> bytes:
    """A message on the wire: header plus payload."""
    crc = checksum(msg.data) if with_checksum else 0
    return (
        HEADER.pack(msg.command, msg.arg0, msg.arg1, len(msg.data), crc, msg.command ^ 0xFFFFFFFF)
        + msg.data
    )


# --------------------------------------------------------------------------- streams


class Stream:
    """One open stream: the host's local-id, ours, inbound data and flow control."""

    def __init__(self, conn: Connection, local_id: int, remote_id: int) -> None:
        self.conn = conn
        self.local_id = local_id  # ours
        self.remote_id = remote_id  # the host's
        self._inbound: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._can_write = asyncio.Event()
        self._can_write.set()
        self.closed = False
        self.task: asyncio.Task[None] | None = None
        self._pending = b""

    # inbound (host -> service)
    def feed(self, data: bytes) -> None:
        self._inbound.put_nowait(data)

    def feed_eof(self) -> None:
        self._inbound.put_nowait(None)

    async def read(self) -> bytes:
        """The next chunk the host wrote (acknowledged now), or b"" when it closed."""
        if self._pending:
            pending, self._pending = self._pending, b""
            return pending
        data = await self._inbound.get()
        if data is None:
            self._inbound.put_nowait(None)
            return b""
        if not self.closed:
            await self.conn.send(Message(Command.OKAY, self.local_id, self.remote_id))
        return data

    async def read_exactly(self, n: int) -> bytes:
        """Exactly ``n`` bytes; raises EOFError when the host closes first."""
        buf = bytearray()
        while len(buf) < n:
            chunk = await self.read()
            if not chunk:
                raise EOFError
            buf += chunk
        if len(buf) > n:
            self._pending = bytes(buf[n:]) + self._pending
        return bytes(buf[:n])

    # outbound (service -> host)
    def acknowledged(self) -> None:
        self._can_write.set()

    async def write(self, data: bytes) -> None:
        """Send ``data`` in WRTE messages, one outstanding until the host's OKAY."""
        view = memoryview(data)
        while view:
            if self.closed:
                raise ConnectionResetError("stream closed by the host")
            await self._can_write.wait()
            if self.closed:
                raise ConnectionResetError("stream closed by the host")
            chunk = bytes(view[: self.conn.max_payload])
            view = view[len(chunk) :]
            self._can_write.clear()
            await self.conn.send(Message(Command.WRTE, self.local_id, self.remote_id, chunk))

    async def close(self) -> None:
        """Close from our side (CLSE) unless already closed."""
        if self.closed:
            return
        self.closed = True
        self._can_write.set()
        self.conn.streams.pop(self.local_id, None)
        with contextlib.suppress(ConnectionError):
            await self.conn.send(Message(Command.CLSE, self.local_id, self.remote_id))

    def closed_by_host(self) -> None:
        self.closed = True
        self._can_write.set()
        self.feed_eof()
        if self.task is not None:
            self.task.cancel()


class Connection:
    """One TCP connection from an adb server: handshake, then multiplexed streams."""

    def __init__(
        self, adbd: EmulatedAdbd, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.adbd = adbd
        self.reader = reader
        self.writer = writer
        self.version = A_VERSION_MIN
        self.max_payload = MAX_PAYLOAD
        self.online = False
        self.streams: dict[int, Stream] = {}
        self._next_id = 1
        self._write_lock = asyncio.Lock()

    async def send(self, msg: Message) -> None:
        if self.writer.is_closing():
            raise ConnectionResetError("connection closed")
        wire = encode_message(msg, with_checksum=self.version < A_VERSION_SKIP_CHECKSUM)
        async with self._write_lock:
            self.writer.write(wire)
            await self.writer.drain()

    async def read_message(self) -> Message:
        header = await self.reader.readexactly(HEADER.size)
        command, arg0, arg1, length, crc, magic = HEADER.unpack(header)
        if magic != command ^ 0xFFFFFFFF:
            raise ProtocolError(f"bad magic {magic:#010x} for command {command:#010x}")
        if length > max(self.max_payload, MAX_PAYLOAD_V1):
            raise ProtocolError(f"payload of {length} bytes exceeds {self.max_payload}")
        data = await self.reader.readexactly(length) if length else b""
        # Legacy peers sum the payload; 0 means "not computed", which newer hosts send.
        if self.version < A_VERSION_SKIP_CHECKSUM and crc not in (0, checksum(data)):
            raise ProtocolError("payload checksum mismatch")
        return Message(command, arg0, arg1, data)

    async def serve(self) -> None:
        peer = self.writer.get_extra_info("peername")
        try:
            # A peer that never completes the handshake is not an adb server: drop it.
            await self.handle(await asyncio.wait_for(self.read_message(), HANDSHAKE_TIMEOUT_S))
            while True:
                msg = await self.read_message()
                await self.handle(msg)
        except (asyncio.IncompleteReadError, ConnectionError):
            log.debug("adb connection from %s closed", peer)
        except TimeoutError:
            log.warning("dropping adb connection from %s: no handshake", peer)
        except ProtocolError as exc:
            log.warning("dropping adb connection from %s: %s", peer, exc)
        finally:
            await self.shutdown()

    async def shutdown(self) -> None:
        for stream in list(self.streams.values()):
            stream.closed_by_host()
        tasks = [s.task for s in self.streams.values() if s.task is not None]
        self.streams.clear()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()

    async def handle(self, msg: Message) -> None:
        cmd = msg.command
        if cmd == Command.CNXN:
            if msg.arg0 < A_VERSION_MIN or msg.arg1 < 256:
                raise ProtocolError(f"unsupported CNXN version {msg.arg0:#x}/{msg.arg1}")
            if self.online:  # the host restarted the handshake: forget old streams
                for stream in list(self.streams.values()):
                    stream.closed_by_host()
                self.streams.clear()
            self.version = min(msg.arg0, A_VERSION)
            self.max_payload = min(msg.arg1, MAX_PAYLOAD)
            banner = self.adbd.config.banner(FEATURES).encode()
            self.online = True
            await self.send(Message(Command.CNXN, A_VERSION, self.max_payload, banner))
            return
        if not self.online:
            if cmd in (Command.AUTH, Command.STLS, Command.SYNC):
                return
            raise ProtocolError(f"{cmd:#x} before the CNXN handshake")
        if cmd == Command.OPEN:
            await self.open(msg)
        elif cmd in (Command.OKAY, Command.WRTE, Command.CLSE):
            self.route(msg)
        # AUTH, STLS and unknown commands with a valid magic are ignored, as adbd does.

    def route(self, msg: Message) -> None:
        """Deliver OKAY, WRTE or CLSE to the stream it names (unknown ids are ignored)."""
        stream = self.streams.get(msg.arg1)
        if stream is None and msg.command == Command.CLSE and msg.arg1 == 0:
            # The host closed before it learnt our id: find the stream by the host's id.
            stream = next((x for x in self.streams.values() if x.remote_id == msg.arg0), None)
        if stream is None:
            return
        if msg.command == Command.OKAY:
            stream.remote_id = msg.arg0
            stream.acknowledged()
        elif msg.command == Command.WRTE:
            stream.feed(msg.data)
        else:
            self.streams.pop(stream.local_id, None)
            stream.closed_by_host()

    async def open(self, msg: Message) -> None:
        if msg.arg0 == 0:
            raise ProtocolError("OPEN with local-id 0")
        service = msg.data.split(b"\0", 1)[0].decode("utf-8", errors="replace")
        handler = self.adbd.service_for(service)
        if handler is None:
            log.info("refusing unknown service %r", service)
            await self.send(Message(Command.CLSE, 0, msg.arg0))
            return
        local_id = self._next_id
        self._next_id += 1
        stream = Stream(self, local_id, msg.arg0)
        self.streams[local_id] = stream
        await self.send(Message(Command.OKAY, local_id, msg.arg0))
        stream.task = asyncio.create_task(self._run(stream, handler), name=f"adb:{service}")

    async def _run(self, stream: Stream, handler: Callable[[Stream], Awaitable[None]]) -> None:
        try:
            await handler(stream)
        except (asyncio.CancelledError, ConnectionError, EOFError):
            pass
        except Exception:  # a service bug must not take the connection down
            log.exception("service failed")
        finally:
            if not self.writer.is_closing():
                with contextlib.suppress(Exception):
                    await stream.close()
            stream.closed = True


# --------------------------------------------------------------------------- services


def _set_pdeathsig() -> None:
    """In the child: get SIGTERM when adbd dies; the toolbox's run.sh then kills its group."""
    die_with_parent()


def _kill_group(proc: asyncio.subprocess.Process, always: bool = False) -> None:
    """Kill the command's whole process group (it is a session leader) if it still runs."""
    if always or proc.returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


async def _start_process(argv: list[str], **kwargs: Any) -> asyncio.subprocess.Process:
    """Start a command in its own session; if the stream closes meanwhile, kill its group.

    asyncio would otherwise kill only the direct child when the spawn is cancelled, and
    the shell's children would outlive the stream.
    """
    spawning = asyncio.ensure_future(
        asyncio.create_subprocess_exec(*argv, start_new_session=True, **kwargs)
    )
    try:
        return await asyncio.shield(spawning)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            proc = await spawning
            _kill_group(proc, always=True)
            await proc.wait()
        raise


async def _spawn(
    adbd: EmulatedAdbd, command: str, merge_stderr: bool
) -> asyncio.subprocess.Process:
    return await _start_process(
        adbd.toolbox.argv(command),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT if merge_stderr else asyncio.subprocess.PIPE,
        env=adbd.toolbox.environment(),
        cwd="/",
        preexec_fn=_set_pdeathsig,
    )


async def _pump_stdin_raw(stream: Stream, proc: asyncio.subprocess.Process) -> None:
    assert proc.stdin is not None
    try:
        while chunk := await stream.read():
            proc.stdin.write(chunk)
            await proc.stdin.drain()
    except (ConnectionError, BrokenPipeError):
        pass
    finally:
        with contextlib.suppress(Exception):
            proc.stdin.close()


async def shell_raw(adbd: EmulatedAdbd, stream: Stream, command: str, merge_stderr: bool) -> None:
    """``shell:`` (stdout+stderr merged) and ``exec:`` (stdout only): raw bytes, no exit code."""
    proc = await _spawn(adbd, command or "/bin/sh", merge_stderr=merge_stderr)
    stdin_task = asyncio.create_task(_pump_stdin_raw(stream, proc))
    drain_err = None
    if not merge_stderr and proc.stderr is not None:
        drain_err = asyncio.create_task(proc.stderr.read())
    try:
        assert proc.stdout is not None
        while chunk := await proc.stdout.read(stream.conn.max_payload // 2):
            await stream.write(_line_ends(adbd, chunk))
        await proc.wait()
    finally:
        _kill_group(proc)
        stdin_task.cancel()
        if drain_err is not None:
            drain_err.cancel()
        with contextlib.suppress(Exception):
            await proc.wait()


def _line_ends(adbd: EmulatedAdbd, data: bytes) -> bytes:
    """A phone with ``crlf_output`` ends its output lines with CRLF (old adbd without shell
    v2 ran commands on a pty, whose ONLCR turns LF into CRLF)."""
    return data.replace(b"\n", b"\r\n") if adbd.config.crlf_output else data


def _shell_packet(kind: ShellId, data: bytes) -> bytes:
    return struct.pack("<BI", kind, len(data)) + data


async def _pump_stdin_v2(stream: Stream, proc: asyncio.subprocess.Process) -> None:
    assert proc.stdin is not None
    try:
        while True:
            header = await stream.read_exactly(5)
            kind, length = struct.unpack("<BI", header)
            data = await stream.read_exactly(length) if length else b""
            if kind == ShellId.STDIN:
                proc.stdin.write(data)
                await proc.stdin.drain()
            elif kind == ShellId.CLOSE_STDIN:
                proc.stdin.close()
            # WINDOW_SIZE_CHANGE has no meaning without a pty.
    except (EOFError, ConnectionError, BrokenPipeError):
        pass
    finally:
        with contextlib.suppress(Exception):
            proc.stdin.close()


async def shell_v2(adbd: EmulatedAdbd, stream: Stream, command: str) -> None:
    """``shell,v2[,raw]:`` — stdout, stderr and the exit status in shell protocol packets."""
    proc = await _spawn(adbd, command or "/bin/sh", merge_stderr=False)
    stdin_task = asyncio.create_task(_pump_stdin_v2(stream, proc))
    room = stream.conn.max_payload - 5

    async def forward(pipe: asyncio.StreamReader | None, kind: ShellId) -> None:
        assert pipe is not None
        while chunk := await pipe.read(room // 2):
            await stream.write(_shell_packet(kind, _line_ends(adbd, chunk)))

    try:
        await asyncio.gather(
            forward(proc.stdout, ShellId.STDOUT), forward(proc.stderr, ShellId.STDERR)
        )
        status = await proc.wait()
        code = status if status >= 0 else 128 - status  # killed by a signal: 128 + signo
        await stream.write(_shell_packet(ShellId.EXIT, bytes([code & 0xFF])))
    finally:
        _kill_group(proc)
        stdin_task.cancel()
        with contextlib.suppress(Exception):
            await proc.wait()


_WINSIZE = re.compile(rb"(\d+)x(\d+),(\d+)x(\d+)")


async def shell_pty(adbd: EmulatedAdbd, stream: Stream, command: str, v2: bool, term: str) -> None:
    """``shell,v2,pty:`` and interactive ``shell:``: the command on a pseudo-terminal."""
    master, slave = pty.openpty()
    env = adbd.toolbox.environment()
    env["TERM"] = term

    def child_setup() -> None:
        _set_pdeathsig()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    try:
        proc = await _start_process(
            adbd.toolbox.argv(command or "/bin/sh"),
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=env,
            cwd="/",
            preexec_fn=child_setup,
        )
    except BaseException:
        os.close(master)
        raise
    finally:
        os.close(slave)
    os.set_blocking(master, False)
    loop = asyncio.get_running_loop()
    output: asyncio.Queue[bytes] = asyncio.Queue()
    room = stream.conn.max_payload - (5 if v2 else 0)

    def readable() -> None:
        try:
            data = os.read(master, room)
        except BlockingIOError:
            return
        except OSError:  # EIO: every slave end is closed
            data = b""
        loop.remove_reader(master)  # resumed once this chunk is on its way (flow control)
        output.put_nowait(data)

    async def to_terminal(data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(master, view) :]
            except BlockingIOError:
                await asyncio.sleep(0.01)

    async def pump_input() -> None:
        try:
            while True:
                if not v2:
                    chunk = await stream.read()
                    if not chunk:
                        return
                    await to_terminal(chunk)
                    continue
                kind, length = struct.unpack("<BI", await stream.read_exactly(5))
                data = await stream.read_exactly(length) if length else b""
                if kind == ShellId.STDIN:
                    await to_terminal(data)
                elif kind == ShellId.WINDOW_SIZE_CHANGE:
                    m = _WINSIZE.match(data)
                    if m:
                        rows, cols, xpix, ypix = (int(g) for g in m.groups())
                        winsize = struct.pack("HHHH", rows, cols, xpix, ypix)
                        fcntl.ioctl(master, termios.TIOCSWINSZ, winsize)
                # CLOSE_STDIN means nothing to a terminal: the session ends with the command.
        except (EOFError, ConnectionError, OSError):
            pass

    stdin_task = asyncio.create_task(pump_input())
    loop.add_reader(master, readable)
    try:
        while chunk := await output.get():
            await stream.write(_shell_packet(ShellId.STDOUT, chunk) if v2 else chunk)
            loop.add_reader(master, readable)
        status = await proc.wait()
        if v2:
            code = status if status >= 0 else 128 - status
            await stream.write(_shell_packet(ShellId.EXIT, bytes([code & 0xFF])))
    finally:
        loop.remove_reader(master)
        os.close(master)
        _kill_group(proc)
        stdin_task.cancel()
        with contextlib.suppress(Exception):
            await proc.wait()


async def say(stream: Stream, text: str) -> None:
    """A service that only prints a line (root:, unroot:, reboot:)."""
    await stream.write(text.encode())


async def tcp_forward(stream: Stream, host: str, port: int) -> None:
    """``tcp:PORT[:HOST]`` — a socket to a port reachable from the phone (adb forward)."""
    reader, writer = await asyncio.open_connection(host, port)

    async def upstream() -> None:
        while chunk := await stream.read():
            writer.write(chunk)
            await writer.drain()
        with contextlib.suppress(OSError):
            writer.write_eof()

    up = asyncio.create_task(upstream())
    try:
        while chunk := await reader.read(stream.conn.max_payload):
            await stream.write(chunk)
    finally:
        up.cancel()
        writer.close()


# sync ---------------------------------------------------------------------------------

_STAT_V1 = struct.Struct("<4sIII")
_STAT_V2 = struct.Struct("<4sIQQIIIIQqqq")
_DENT_V1 = struct.Struct("<4sIIII")
_DENT_V2 = struct.Struct("<4sIQQIIIIQqqqI")


def _stat_v2_fields(st: os.stat_result) -> tuple[int, ...]:
    return (
        st.st_dev,
        st.st_ino,
        st.st_mode,
        st.st_nlink,
        st.st_uid,
        st.st_gid,
        st.st_size,
        int(st.st_atime),
        int(st.st_mtime),
        int(st.st_ctime),
    )


class SyncSession:
    """The ``sync:`` service: STAT/STA2/LST2, LIST/LIS2, SEND/SND2, RECV/RCV2, QUIT."""

    def __init__(self, adbd: EmulatedAdbd, stream: Stream) -> None:
        self.adbd = adbd
        self.stream = stream
        self.out = bytearray()

    async def flush(self) -> None:
        if self.out:
            data, self.out = bytes(self.out), bytearray()
            await self.stream.write(data)

    async def emit(self, data: bytes) -> None:
        self.out += data
        if len(self.out) >= self.stream.conn.max_payload:
            await self.flush()

    async def fail(self, reason: str) -> None:
        raw = reason.encode()
        await self.emit(b"FAIL" + struct.pack("<I", len(raw)) + raw)
        await self.flush()

    def host_path(self, path: str, follow: bool = True) -> Path:
        return self.adbd.toolbox.host_path(path, follow=follow)

    async def run(self) -> None:
        while True:
            request = await self.stream.read_exactly(8)
            ident, length = struct.unpack("<4sI", request)
            if length > 1024:
                await self.fail("path too long")
                return
            path = (await self.stream.read_exactly(length)).decode("utf-8", errors="replace")
            if ident == b"QUIT":
                await self.flush()
                return
            handler = {
                b"STAT": self.stat_v1,
                b"STA2": self.stat_v2,
                b"LST2": self.stat_v2,
                b"LIST": self.list_v1,
                b"LIS2": self.list_v2,
                b"SEND": self.send_v1,
                b"SND2": self.send_v2,
                b"RECV": self.recv_v1,
                b"RCV2": self.recv_v2,
            }.get(ident)
            if handler is None:
                await self.fail(f"unknown command {int.from_bytes(ident, 'little'):08x}")
                return
            if await handler(ident, path) is False:
                return
            await self.flush()

    async def stat_v1(self, ident: bytes, path: str) -> None:
        try:
            st = os.lstat(self.host_path(path, follow=False))
            fields = (st.st_mode, st.st_size & 0xFFFFFFFF, int(st.st_mtime) & 0xFFFFFFFF)
        except OSError:
            fields = (0, 0, 0)
        await self.emit(_STAT_V1.pack(b"STAT", *fields))

    async def stat_v2(self, ident: bytes, path: str) -> None:
        try:
            target = self.host_path(path, follow=ident == b"STA2")
            st = os.stat(target) if ident == b"STA2" else os.lstat(target)
            await self.emit(_STAT_V2.pack(ident, 0, *_stat_v2_fields(st)))
        except OSError as exc:
            await self.emit(_STAT_V2.pack(ident, exc.errno or 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0))

    def _entries(self, path: str) -> list[tuple[str, os.stat_result]]:
        base = self.host_path(path)
        entries = []
        for name in [".", "..", *sorted(os.listdir(base))]:
            with contextlib.suppress(OSError):
                entries.append((name, os.lstat(base / name)))
        return entries

    async def list_v1(self, ident: bytes, path: str) -> None:
        with contextlib.suppress(OSError):
            for name, st in self._entries(path):
                raw = name.encode()
                await self.emit(
                    _DENT_V1.pack(
                        b"DENT",
                        st.st_mode,
                        st.st_size & 0xFFFFFFFF,
                        int(st.st_mtime) & 0xFFFFFFFF,
                        len(raw),
                    )
                    + raw
                )
        await self.emit(_DENT_V1.pack(b"DONE", 0, 0, 0, 0))

    async def list_v2(self, ident: bytes, path: str) -> None:
        with contextlib.suppress(OSError):
            for name, st in self._entries(path):
                raw = name.encode()
                await self.emit(_DENT_V2.pack(b"DNT2", 0, *_stat_v2_fields(st), len(raw)) + raw)
        await self.emit(_DENT_V2.pack(b"DONE", 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0))

    async def send_v1(self, ident: bytes, spec: str) -> bool:
        path, comma, mode_text = spec.rpartition(",")
        if not comma:
            await self.fail("missing , in ID_SEND_V1")
            return False
        try:
            mode = int(mode_text, 0)
        except ValueError:
            await self.fail("bad mode")
            return False
        return await self._receive_file(path, mode)

    async def send_v2(self, ident: bytes, path: str) -> bool:
        _, mode, flags = struct.unpack("<4sII", await self.stream.read_exactly(12))
        if flags:
            await self.fail(f"unknown flags: {flags}")
            return False
        return await self._receive_file(path, mode)

    async def _receive_file(self, path: str, mode: int) -> bool:
        if stat.S_ISLNK(mode):
            await self.fail("symlinks are not supported by the lab phone")
            return False
        target = self.host_path(path, follow=False)
        # As adbd does: copy the user permission bits to group, then group to other.
        perm = mode & 0o777
        perm |= (perm >> 3) & 0o070
        perm |= (perm >> 3) & 0o007
        error: str | None = None
        tmp_fd, tmp_name = -1, ""
        if not self.adbd.toolbox.is_phone_path(path):
            # Only the phone's own tree is writable; the rest is the host, read-only as /system.
            error = "couldn't create file: Read-only file system"
        else:
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp_fd, tmp_name = tempfile.mkstemp(prefix=".adb-push.", dir=target.parent)
            except OSError as exc:
                error = f"couldn't create file: {exc.strerror}"
        mtime = 0
        try:
            while True:
                ident, size = struct.unpack("<4sI", await self.stream.read_exactly(8))
                if ident == b"DONE":
                    mtime = size
                    break
                if ident != b"DATA" or size > SYNC_DATA_MAX:
                    await self.fail(
                        "invalid data message" if ident != b"DATA" else "oversize data message"
                    )
                    return False
                data = await self.stream.read_exactly(size)
                if error is None:
                    try:
                        os.write(tmp_fd, data)
                    except OSError as exc:
                        error = f"write failed: {exc.strerror}"
            if error is None:
                try:
                    os.fchmod(tmp_fd, perm)
                    os.close(tmp_fd)
                    tmp_fd = -1
                    os.utime(tmp_name, (mtime, mtime))
                    os.replace(tmp_name, target)
                    tmp_name = ""
                except OSError as exc:
                    error = f"couldn't create file: {exc.strerror}"
        finally:
            if tmp_fd >= 0:
                os.close(tmp_fd)
            if tmp_name:
                with contextlib.suppress(OSError):
                    os.unlink(tmp_name)
        if error is not None:  # as adbd: report, then end the sync session
            await self.fail(error)
            return False
        await self.emit(b"OKAY" + struct.pack("<I", 0))
        return True

    async def recv_v1(self, ident: bytes, path: str) -> bool:
        return await self._send_file(path)

    async def recv_v2(self, ident: bytes, path: str) -> bool:
        _, flags = struct.unpack("<4sI", await self.stream.read_exactly(8))
        if flags:
            await self.fail(f"unknown flags: {flags}")
            return False
        return await self._send_file(path)

    async def _send_file(self, path: str) -> bool:
        try:
            f = open(self.host_path(path), "rb")  # noqa: SIM115 - closed below
        except OSError as exc:
            await self.fail(f"open failed: {exc.strerror}")
            return False
        with f:
            while True:
                try:
                    chunk = f.read(SYNC_DATA_MAX)
                except OSError as exc:
                    await self.fail(f"read failed: {exc.strerror}")
                    return False
                if not chunk:
                    break
                await self.emit(b"DATA" + struct.pack("<I", len(chunk)) + chunk)
        await self.emit(b"DONE" + struct.pack("<I", 0))
        return True


# --------------------------------------------------------------------------- server


class EmulatedAdbd:
    """An emulated adbd for one virtual phone, serving ADB over TCP from a background thread."""

    def __init__(
        self,
        config: PhoneConfig,
        host: str = "127.0.0.1",
        port: int = 0,
        state_dir: str | os.PathLike[str] | None = None,
        netns: str | None = None,
        use_mount_namespace: bool | None = None,
    ) -> None:
        self.config = config
        self.host = host
        self.port = port
        self._own_state_dir = state_dir is None
        if state_dir is None:
            state_dir = tempfile.mkdtemp(prefix=f"flowtruth-phone-{config.serial}-")
        try:
            self.toolbox = Toolbox(
                config, state_dir, netns=netns, use_mount_namespace=use_mount_namespace
            )
        except BaseException:
            if self._own_state_dir:
                shutil.rmtree(state_dir, ignore_errors=True)
            raise
        self.state_dir = self.toolbox.state_dir
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.base_events.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> str:
        """``HOST:PORT`` as ``adb connect`` takes it."""
        return f"{self.host}:{self.port}"

    def service_for(self, service: str) -> Callable[[Stream], Awaitable[None]] | None:
        """The coroutine serving an OPENed service name, or None for unknown services."""
        name, _, rest = service.partition(":")
        if name == "shell" or name.startswith("shell,"):
            options = name.split(",")[1:]
            v2 = "v2" in options
            term = next((o[5:] for o in options if o.startswith("TERM=")), "dumb")
            # As adbd: a pty when asked for, or for an interactive shell unless "raw".
            if "pty" in options or (not rest and "raw" not in options):
                return lambda s: shell_pty(self, s, rest, v2=v2, term=term)
            if v2:
                return lambda s: shell_v2(self, s, rest)
            return lambda s: shell_raw(self, s, rest, merge_stderr=True)
        if name == "exec":
            return lambda s: shell_raw(self, s, rest, merge_stderr=False)
        if service == "sync:":
            return lambda s: SyncSession(self, s).run()
        if service == "root:":
            return lambda s: say(s, "adbd cannot run as root in production builds\n")
        if service == "unroot:":
            return lambda s: say(s, "adbd not running as root\n")
        if name == "reboot":
            return lambda s: say(s, "reboot refused: this is a flowtruth virtual-lab phone\n")
        if name == "tcp" and rest:
            port_text, _, host = rest.partition(":")
            if port_text.isdigit():
                return lambda s: tcp_forward(s, host or "127.0.0.1", int(port_text))
        return None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            await Connection(self, reader, writer).serve()
        finally:
            self._connections.discard(task)

    async def _start(self) -> None:
        # Started from the loop thread, which lives as long as this adbd: the namespace
        # holder dies with that thread (PR_SET_PDEATHSIG), not with whoever called start().
        self.toolbox.start()
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.gather(*self._connections, return_exceptions=True)

    def start(self) -> EmulatedAdbd:
        """Prepare the phone's state and listen; returns once the port is bound."""
        if self._thread is not None:
            return self
        self.toolbox.prepare()
        loop = asyncio.new_event_loop()
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._start())
            except BaseException as exc:  # reported to start()'s caller
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._stop())
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=run, name=f"adbd-{self.config.serial}", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            self._thread.join()
            self._thread = None
            self.toolbox.stop()
            if self._own_state_dir:
                self.toolbox.remove()
            exc = failure[0]
            raise LabError(
                f"emulated adbd for {self.config.serial} cannot listen on "
                f"{self.host}:{self.port}: {exc}"
            ) from exc
        log.info("emulated adbd %s listening on %s", self.config.serial, self.address)
        return self

    def stop(self) -> None:
        """Drop every connection, kill running commands, stop listening."""
        if self._thread is None or self._loop is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._thread = None
        self._loop = None
        self.toolbox.stop()
        if self._own_state_dir:
            self.toolbox.remove()

    def __enter__(self) -> EmulatedAdbd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    """``python -m controller.lab.adbd``: serve one phone until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(
        prog="python -m controller.lab.adbd", description=__doc__.split("\n")[0]
    )
    who = parser.add_mutually_exclusive_group(required=True)
    who.add_argument("--config", help="phone config file (YAML or JSON PhoneConfig)")
    who.add_argument("--preset", choices=sorted(PRESETS), help="a ready-made phone")
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on")
    parser.add_argument("--port", type=int, default=5555, help="TCP port (0: any free port)")
    parser.add_argument("--state-dir", help="the phone's state directory (default: a temp dir)")
    parser.add_argument("--serial", help="override the config's serial")
    parser.add_argument("--netns", help="run shell commands in this network namespace")
    parser.add_argument(
        "--no-mount-ns",
        action="store_true",
        help="no private mount namespace per command (device paths are rewritten instead)",
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="adbd %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    try:
        config = load_phone_config(args.config) if args.config else PRESETS[args.preset]()
        if args.serial:
            config = config.model_copy(update={"serial": args.serial})
        adbd = EmulatedAdbd(
            config,
            args.host,
            args.port,
            args.state_dir,
            netns=args.netns,
            use_mount_namespace=False if args.no_mount_ns else None,
        )
        stop = threading.Event()
        for signo in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signo, lambda *_: stop.set())
        adbd.start()
    except ControllerError as err:
        print(f"adbd: {err.one_line()}", file=sys.stderr)
        return err.exit_code
    print(f"listening on {adbd.address}", flush=True)
    try:
        stop.wait()
    finally:
        adbd.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
