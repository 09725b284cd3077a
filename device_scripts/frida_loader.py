"""Loads ``frida_agent.js`` into a process and appends its socket events as JSON lines.

``FridaTracer`` attaches to a pid (or spawns a command line), writes every event the agent
reports as one JSON object per line (see the agent's header for the fields) and detaches
cleanly on :meth:`FridaTracer.stop`. :func:`assign_tracers` splits a package's processes
between strace and frida so that no pid is traced by both.

:class:`FridaPackageTracer` follows every process of a package (or only its main one)
across restarts, one file per process.

Command line: ``python -m device_scripts.frida_loader --pid N --out FILE`` (or
``--spawn PROG ARG...``, or ``--package PKG --out DIR [--role all|main]``), optionally
``--device usb|local|<id>`` and ``--duration S``; it runs until SIGINT/SIGTERM, the
duration ends or (for one pid) the process exits.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from analysis.errors import FlowtruthError
from device_scripts import script_path

TRACERS: tuple[str, ...] = ("strace", "frida", "both")


class FridaTracerError(FlowtruthError):
    """Frida could not attach to, instrument or detach from a process."""


@dataclass(frozen=True, slots=True)
class TracerAssignment:
    """Which pids strace traces and which frida traces; the two never share a pid."""

    strace: tuple[int, ...]
    frida: tuple[int, ...]


def assign_tracers(processes: Mapping[int, str], package: str, tracer: str) -> TracerAssignment:
    """Split a package's processes (pid -> argv[0]) between the tracers.

    ``strace`` and ``frida`` take every process; ``both`` gives frida the main process
    (argv[0] equal to the package, where the app's own networking and DNS happen) and
    strace every other one (``pkg:service`` processes), which is what
    ``strace_launcher.sh PACKAGE OUTDIR STRACE INTERVAL secondary`` does on the phone.
    """
    if tracer not in TRACERS:
        raise FridaTracerError(
            f"unknown tracer {tracer!r}", hint=f"use one of: {', '.join(TRACERS)}"
        )
    pids = tuple(sorted(processes))
    if tracer == "strace":
        return TracerAssignment(strace=pids, frida=())
    if tracer == "frida":
        return TracerAssignment(strace=(), frida=pids)
    main = tuple(p for p in pids if processes[p] == package)
    rest = tuple(p for p in pids if processes[p] != package)
    return TracerAssignment(strace=rest, frida=main)


def agent_source() -> str:
    """The agent's JavaScript source as shipped."""
    return script_path("frida_agent.js").read_text(encoding="utf-8")


def _frida() -> Any:
    try:
        import frida
    except ImportError as e:  # pragma: no cover - frida is a declared dependency
        raise FridaTracerError(
            "the frida Python package is not installed", hint="pip install frida"
        ) from e
    return frida


def _frida_errors() -> tuple[type[BaseException], ...]:
    """Every exception class the frida bindings raise (they share no base class)."""
    frida = _frida()
    names = (
        "AddressInUseError ExecutableNotFoundError ExecutableNotSupportedError "
        "InvalidArgumentError InvalidOperationError NotSupportedError OperationCancelledError "
        "PermissionDeniedError ProcessNotFoundError ProcessNotRespondingError ProtocolError "
        "RPCException ServerNotRunningError TimedOutError TransportError"
    ).split()
    return tuple(getattr(frida, n) for n in names if isinstance(getattr(frida, n, None), type))


def get_device(spec: str = "local") -> Any:
    """A frida device: ``local``, ``usb`` or a device id as ``frida-ls-devices`` lists it."""
    frida = _frida()
    try:
        if spec == "local":
            return frida.get_local_device()
        if spec == "usb":
            return frida.get_usb_device(timeout=5)
        return frida.get_device(spec, timeout=5)
    except _frida_errors() as e:
        raise FridaTracerError(f"frida device {spec!r} not available: {e}") from e


class FridaTracer:
    """Runs the agent in one process and appends its events to ``out`` as JSON lines.

    Give either ``pid`` (attach) or ``argv`` (spawn, instrument, then resume, so even the
    first connect is seen). ``start`` and ``stop`` may each be called once; ``stop`` is
    also safe after the process exited. Usable as a context manager.
    """

    def __init__(
        self,
        out: str | Path,
        *,
        pid: int | None = None,
        argv: Sequence[str] | None = None,
        device: Any = None,
        on_detached: Callable[[str], None] | None = None,
    ) -> None:
        if (pid is None) == (argv is None):
            raise FridaTracerError("give exactly one of pid or argv")
        self.out = Path(out)
        self.pid = pid
        self.argv = list(argv) if argv is not None else None
        self._device = device
        self._on_detached_cb = on_detached
        self._session: Any = None
        self._script: Any = None
        self._file: IO[str] | None = None
        self._lock = threading.Lock()
        self.events_written = 0
        self.errors: list[str] = []
        self.detached_reason: str | None = None
        self.info: dict[str, Any] = {}
        self._detached = threading.Event()

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Attach (or spawn), load the agent and start writing; raises FridaTracerError."""
        frida = _frida()
        device = self._device if self._device is not None else get_device("local")
        spawned = False
        try:
            self._file = open(self.out, "a", encoding="utf-8")  # noqa: SIM115
        except OSError as e:
            raise FridaTracerError(f"cannot write {self.out}: {e.strerror}") from e
        try:
            if self.argv is not None:
                self.pid = device.spawn(self.argv)
                spawned = True
            self._session = device.attach(self.pid)
            self._session.on("detached", self._on_detached)
            self._script = self._session.create_script(agent_source(), name="flowtruth_agent")
            self._script.on("message", self._on_message)
            self._script.load()
            self.info = dict(self._script.exports_sync.info())
            if spawned:
                device.resume(self.pid)
        except frida.ProcessNotFoundError as e:
            self._abort(device, spawned)
            raise FridaTracerError(f"no process with pid {self.pid}") from e
        except frida.PermissionDeniedError as e:
            self._abort(device, spawned)
            raise FridaTracerError(
                f"frida may not attach to pid {self.pid}: {e}",
                hint="run as root, or lower /proc/sys/kernel/yama/ptrace_scope",
            ) from e
        except (frida.ExecutableNotFoundError, frida.NotSupportedError) as e:
            self._abort(device, spawned)
            raise FridaTracerError(f"frida cannot instrument {self.argv or self.pid}: {e}") from e
        except _frida_errors() as e:  # timeouts, lost transport, RPC failures, ...
            self._abort(device, spawned)
            raise FridaTracerError(
                f"frida failed on pid {self.pid} while starting: {type(e).__name__}: {e}"
            ) from e
        if not self.info.get("hooks"):
            self.stop()
            raise FridaTracerError(f"the agent found no libc socket functions in pid {self.pid}")

    def stop(self) -> None:
        """Flush the agent, unload it, detach and close the file (idempotent)."""
        script, session = self._script, self._session
        if script is not None and not self._detached.is_set():
            try:
                script.exports_sync.flush()
                script.unload()
            except Exception:  # the process may have exited meanwhile; nothing to flush
                pass
        if session is not None and not self._detached.is_set():
            try:
                session.detach()
            except Exception:
                pass
        self._cleanup()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the session detaches (process exit); True if it did."""
        return self._detached.wait(timeout)

    def __enter__(self) -> FridaTracer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- callbacks (frida's thread) ----------------------------------------------------

    def _abort(self, device: Any, spawned: bool) -> None:
        """Undo a failed start: detach, and kill a process we spawned (it is suspended)."""
        if self._session is not None:
            try:
                self._session.detach()
            except Exception:
                pass
        if spawned and self.pid is not None:
            try:
                device.kill(self.pid)
            except Exception:
                pass
        self._cleanup()

    def _cleanup(self) -> None:
        self._script = None
        self._session = None
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def _on_message(self, message: Mapping[str, Any], data: Any) -> None:
        if message.get("type") == "send":
            payload = message.get("payload")
            if isinstance(payload, dict) and payload.get("type") == "events":
                self._write(payload.get("events") or [])
            elif isinstance(payload, dict) and payload.get("type") == "hook-error":
                self.errors.append(f"hook {payload.get('hook')}: {payload.get('error')}")
        elif message.get("type") == "error":
            self.errors.append(str(message.get("description", message)))

    def _write(self, events: Sequence[Mapping[str, Any]]) -> None:
        with self._lock:
            if self._file is None:
                return
            for ev in events:
                self._file.write(json.dumps(ev) + "\n")
            self._file.flush()
            self.events_written += len(events)

    def _on_detached(self, reason: str, *rest: object) -> None:
        self.detached_reason = reason
        # The last batch may still be in flight only when the process died; the file is
        # closed by stop().
        if reason != "application-requested":
            self._detached.set()
        if self._on_detached_cb is not None:
            self._on_detached_cb(reason)


class FridaPackageTracer:
    """Keeps a :class:`FridaTracer` in every process of a package that frida owns, like
    ``strace_launcher.sh`` does for strace, including processes that start later (an app
    restart); one file per process, ``OUTDIR/frida.<pid>.<procname>.jsonl``.

    ``role`` ``all`` traces every process (``--tracer frida``); ``main`` only the main
    process (``--tracer both``, next to the launcher's ``secondary`` role). Processes are
    the device's whose name is the package or ``package:*`` (frida names a process after
    its argv[0], which zygote sets). Calls a process makes before the next scan (up to
    ``interval`` after it starts) are not seen. A pid whose attach fails three times is
    given up; ``errors`` says why. ``accept`` narrows the device's processes (pid -> keep?),
    e.g. to one virtual-lab phone's network namespace when every phone shares one host.
    """

    def __init__(
        self,
        package: str,
        outdir: str | Path,
        *,
        role: str = "all",
        device: Any = None,
        interval: float = 0.5,
        accept: Callable[[int], bool] | None = None,
    ) -> None:
        if role not in ("all", "main"):
            raise FridaTracerError(f"unknown frida role {role!r}", hint="use all or main")
        self.package = package
        self.outdir = Path(outdir)
        self.role = role
        self.interval = interval
        self._device = device
        self._accept = accept
        self.tracers: dict[int, FridaTracer] = {}
        self.finished: list[FridaTracer] = []
        self.errors: list[str] = []
        self._failures: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Scan once (errors surface here), then keep scanning in a thread."""
        if self._device is None:
            self._device = get_device("local")
        try:
            self.outdir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise FridaTracerError(f"cannot create {self.outdir}: {e.strerror}") from e
        self.scan()
        self._thread = threading.Thread(target=self._run, name="frida-package", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop scanning and detach from every process (idempotent)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        for pid in list(self.tracers):
            tracer = self.tracers.pop(pid)
            tracer.stop()
            self.finished.append(tracer)

    def __enter__(self) -> FridaPackageTracer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def processes(self) -> dict[int, str]:
        """The package's processes on the device now: pid -> name (``package`` for the
        main process, ``package:service`` for the others).

        frida-server on Android names an app's main process after the app's label
        ("Signal"), and lists the package among its ``applications``; secondary processes
        keep their ``package:service`` name."""
        try:
            try:
                procs = self._device.enumerate_processes(scope="metadata")
            except TypeError:  # frida before 15 has no scope
                procs = self._device.enumerate_processes()
        except _frida_errors() as e:
            raise FridaTracerError(f"frida could not list the device's processes: {e}") from e
        prefix = self.package + ":"
        out: dict[int, str] = {}
        for p in procs:
            if self._accept is not None and not self._accept(p.pid):
                continue
            apps = (getattr(p, "parameters", None) or {}).get("applications") or ()
            if p.name == self.package or p.name.startswith(prefix):
                out[p.pid] = p.name
            elif self.package in apps:
                out[p.pid] = self.package
        return out

    @property
    def events_written(self) -> int:
        """Events written so far by every tracer, running or finished."""
        return sum(t.events_written for t in (*self.tracers.values(), *self.finished))

    def scan(self) -> None:
        """Forget processes that exited (detached, or no longer listed: frida may report a
        killed process's detach late) and attach to new ones."""
        procs = self.processes()
        for pid, tracer in list(self.tracers.items()):
            if tracer.wait(0) or pid not in procs:
                tracer.stop()
                self.finished.append(self.tracers.pop(pid))
        mine = assign_tracers(procs, self.package, "both" if self.role == "main" else "frida")
        for pid in mine.frida:
            if pid in self.tracers or self._failures.get(pid, 0) >= 3:
                continue
            # the phone's process name: one bounded file-name component
            name = re.sub(r"[^A-Za-z0-9._:-]", "_", procs[pid])[:120]
            tracer = FridaTracer(
                self.outdir / f"frida.{pid}.{name}.jsonl", pid=pid, device=self._device
            )
            try:
                tracer.start()
            except FridaTracerError as e:
                self._failures[pid] = self._failures.get(pid, 0) + 1
                self.errors.append(f"pid {pid}: {e.one_line()}")
                continue
            self.tracers[pid] = tracer

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.scan()
            except FridaTracerError as e:
                self.errors.append(e.one_line())
            except Exception as e:  # keep following the package; report, never crash
                self.errors.append(f"scan failed: {type(e).__name__}: {e}")


def merge_event_files(sources: Sequence[Path], out: Path, shift_s: float = 0.0) -> int:
    """Concatenate per-process event files into one (``out``, written atomically), adding
    ``shift_s`` to every ``ts``; returns the events written. Lines that are not JSON
    objects are copied as they are (the parser counts them)."""
    n = 0
    tmp = out.with_name(out.name + ".part")
    with open(tmp, "w", encoding="utf-8") as w:
        for src in sources:
            with open(src, encoding="utf-8", errors="replace") as f:
                for line in f:
                    if not line.strip():
                        continue
                    if not line.endswith("\n"):  # a last line cut short by a kill
                        line += "\n"
                    if shift_s:
                        try:
                            ev = json.loads(line)
                        except ValueError:
                            ev = None
                        if isinstance(ev, dict) and isinstance(ev.get("ts"), (int, float)):
                            ev["ts"] = round(ev["ts"] + shift_s, 6)
                            line = json.dumps(ev) + "\n"
                    w.write(line)
                    n += 1
        w.flush()
        os.fsync(w.fileno())
    os.replace(tmp, out)
    return n


# -- command line --------------------------------------------------------------------------


def _wait(stop: threading.Event, duration: float | None) -> None:
    deadline = None if duration is None else time.monotonic() + duration
    while not stop.is_set():
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            return
        stop.wait(0.2 if left is None else min(0.2, left))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m device_scripts.frida_loader``."""
    ap = argparse.ArgumentParser(
        prog="python -m device_scripts.frida_loader",
        description="Attach the flowtruth frida agent to processes and log their sockets.",
    )
    target = ap.add_mutually_exclusive_group(required=True)
    target.add_argument("--pid", type=int, help="process to attach to")
    target.add_argument("--package", help="follow every process of this package")
    target.add_argument("--spawn", nargs=argparse.REMAINDER, help="command line to spawn")
    ap.add_argument(
        "--out",
        required=True,
        type=Path,
        help="JSON-lines file to append to (a directory with --package)",
    )
    ap.add_argument(
        "--role",
        choices=("all", "main"),
        default="all",
        help="with --package: all processes, or only the main one (--tracer both)",
    )
    ap.add_argument("--device", default="local", help="local (default), usb or a device id")
    ap.add_argument("--duration", type=float, default=None, help="seconds to trace")
    args = ap.parse_args(argv)
    if args.spawn is not None and not args.spawn:
        ap.error("--spawn needs a command line")

    stop = threading.Event()

    def _stop(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    try:
        device = get_device(args.device)
        if args.package is not None:
            pkg = FridaPackageTracer(args.package, args.out, role=args.role, device=device)
            pkg.start()
        else:
            tracer = FridaTracer(
                args.out,
                pid=args.pid,
                argv=args.spawn,
                device=device,
                on_detached=lambda reason: stop.set(),
            )
            tracer.start()
    except FridaTracerError as e:
        print(f"frida_loader: {e.one_line()}", file=sys.stderr)
        return 1

    if args.package is not None:
        print(f"frida_loader: following {args.package} into {args.out}", file=sys.stderr)
        _wait(stop, args.duration)
        _arm_watchdog(f"detaching from {args.package}")
        pkg.stop()
        done = pkg.finished
        written = sum(t.events_written for t in done)
        print(
            f"frida_loader: {written} events written from {len(done)} processes",
            file=sys.stderr,
        )
        for err in pkg.errors:
            print(f"frida_loader: {err}", file=sys.stderr)
        return 0

    print(f"frida_loader: tracing pid {tracer.pid} into {args.out}", file=sys.stderr)
    _wait(stop, args.duration)
    _arm_watchdog(f"detaching from pid {tracer.pid}")
    tracer.stop()
    reason = tracer.detached_reason
    gone = f"; process detached ({reason})" if reason and reason != "application-requested" else ""
    print(f"frida_loader: {tracer.events_written} events written{gone}", file=sys.stderr)
    return 0


STOP_TIMEOUT_S = 15.0


def _arm_watchdog(what: str, timeout: float = STOP_TIMEOUT_S) -> None:
    """Never hang on the way out: frida's detach or shutdown can block on a wedged helper."""

    def fire() -> None:
        print(f"frida_loader: {what} did not finish in {timeout:.0f} s; exiting", file=sys.stderr,
              flush=True)
        os._exit(1)

    timer = threading.Timer(timeout, fire)
    timer.daemon = True
    timer.start()


def _cli() -> int:
    try:
        return main()
    finally:
        # Tear frida down gracefully (its helper process and temporary files).
        try:
            _frida().shutdown()
        except Exception:
            pass


if __name__ == "__main__":
    sys.exit(_cli())
