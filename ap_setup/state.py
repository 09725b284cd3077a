"""The AP state file: everything ``ap up`` changed, so ``ap down`` can restore it.

Each change is recorded *before* it is made and the file is rewritten atomically,
so after a crash at any point ``ap down`` restores what was there before.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from controller.errors import ApError

STATE_SCHEMA_VERSION = 1


class ProcessRecord(BaseModel):
    """A daemon we started: enough to find it again (pid plus its kernel start time)."""

    model_config = ConfigDict(extra="ignore", use_attribute_docstrings=True)

    name: str
    """hostapd, dnsmasq or capture."""
    pid: int
    """Process id (global: namespaces share the pid space here)."""
    starttime: int | None = None
    """Field 22 of /proc/PID/stat, so a recycled pid is not mistaken for ours."""
    argv: list[str]
    """The command line as started."""
    log: str
    """File receiving its stdout and stderr."""


class LaunchRecord(BaseModel):
    """A daemon ``ap up`` is about to start, recorded *before* it is spawned.

    Its command line names a file in the AP's own directories (the config file, or the
    capture's output), so ``ap down`` finds the process by its ``/proc/PID/cmdline`` even
    when its pid never reached the state file (``ap up`` killed while the daemon started).
    """

    model_config = ConfigDict(extra="ignore", use_attribute_docstrings=True)

    name: str
    """hostapd, dnsmasq or capture."""
    argv: list[str]
    """The command line it is started with."""
    pid_file: str | None = None
    """Where the daemon writes its pid (dnsmasq ``pid-file``), None when it writes none."""


class RestartRecord(BaseModel):
    """One restart of a daemon by the supervisor."""

    model_config = ConfigDict(extra="ignore", use_attribute_docstrings=True)

    at: str
    """UTC time of the restart attempt."""
    reason: str
    """Why it was restarted: how the old process ended and the last lines of its log."""
    old_pid: int
    """The process that had exited."""
    new_pid: int | None = None
    """The process started in its place (None: the restart failed)."""


class DaemonHealth(BaseModel):
    """What the supervisor did for one daemon."""

    model_config = ConfigDict(extra="ignore", use_attribute_docstrings=True)

    restarts: int = 0
    """Restart attempts since ``ap up``."""
    history: list[RestartRecord] = []
    """The most recent restarts, oldest first (at most 20)."""
    gave_up: str | None = None
    """Set when the supervisor stopped restarting it: the one-line reason."""


class SupervisorRecord(BaseModel):
    """The supervisor watching the daemons, found again by pid plus start time."""

    model_config = ConfigDict(extra="ignore", use_attribute_docstrings=True)

    kind: Literal["process", "thread", "foreground"]
    """A detached process of its own, a thread in another program, or ``ap up --foreground``."""
    pid: int
    """Process id of the supervisor (of the program holding the thread)."""
    starttime: int | None = None
    """Field 22 of /proc/PID/stat."""
    log: str
    """File the supervisor logs its restarts to."""
    started_at: str = ""
    """UTC time the supervisor started."""


class ApState(BaseModel):
    """What ``ap up`` changed; ``ap down`` undoes exactly this, in reverse."""

    model_config = ConfigDict(extra="ignore", use_attribute_docstrings=True)

    schema_version: int = STATE_SCHEMA_VERSION
    """Version of this file's layout."""
    status: Literal["starting", "up", "stopping"] = "starting"
    """Where the bring-up or teardown got to."""
    created_at: str = ""
    """UTC time of ``ap up``."""
    interface: str
    """The AP interface."""
    netns: str | None = None
    """Namespace every command ran in."""
    work_dir: str
    """Rendered configs, logs and leases."""
    ssid: str | None = None
    """SSID announced (None without a radio)."""
    passphrase: str | None = None
    """The WPA2 passphrase in use (this file is mode 0600)."""
    rfkill_unblocked: bool = False
    """We ran ``rfkill unblock wifi`` (not undone: blocking the radio again is rarely wanted)."""
    nm_managed_before: bool | None = None
    """NetworkManager managed the interface before (None: NetworkManager not involved)."""
    nm_dropin: str | None = None
    """Path of the NetworkManager drop-in we wrote."""
    nm_dropin_previous: str | None = None
    """Content of a file that was at that path before (None: there was none)."""
    link_was_up: bool | None = None
    """The interface's admin state before (None: untouched)."""
    address_added: str | None = None
    """The address we added to the interface (None: it was already there)."""
    address6_added: str | None = None
    """The IPv6 address we added to the interface (None: none, or it was already there)."""
    offloads_before: dict[str, bool] = {}
    """ethtool feature name -> was on, for each feature we switched off."""
    sysctl_before: dict[str, str] = {}
    """sysctl key -> value before we changed it, restored in this order (a global switch
    first, then the per-interface values that writing the switch overwrites)."""
    firewall: Literal["nft", "iptables"] | None = None
    """NAT backend in use."""
    nft_tables: list[str] = []
    """nftables tables we created (``family name``)."""
    iptables_down: list[list[str]] = []
    """argv lists that remove the iptables chains we added."""
    iptables_new_tables: list[str] = []
    """nftables tables (``family name``) that iptables-nft created for our chains."""
    processes: dict[str, ProcessRecord] = {}
    """Daemons we started, by name."""
    launched: dict[str, LaunchRecord] = {}
    """Every daemon we started or were about to start, by name, recorded before the spawn:
    ``ap down`` also stops processes running these command lines (orphans of a killed
    ``ap up`` or supervisor)."""
    capture_dir: str | None = None
    """Where the capture started with ``ap up --capture`` writes."""
    supervisor: SupervisorRecord | None = None
    """The supervisor restarting exited daemons (None: none running)."""
    health: dict[str, DaemonHealth] = {}
    """Restarts per daemon name, recorded by the supervisor."""

    def save(self, path: Path) -> None:
        """Write atomically (temp file, fsync, rename), mode 0600."""
        path.parent.mkdir(parents=True, exist_ok=True)
        if not self.created_at:
            self.created_at = datetime.now(UTC).isoformat(timespec="seconds")
        data = self.model_dump_json(indent=2)
        fd, tmp = tempfile.mkstemp(prefix=".state-", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(data + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: Path) -> ApState | None:
        """The state at ``path``, or None when there is no file (nothing is up)."""
        try:
            raw = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        try:
            data = json.loads(raw)
            if data.get("schema_version") != STATE_SCHEMA_VERSION:
                raise ApError(
                    f"{path}: state file has schema_version {data.get('schema_version')!r}, "
                    f"expected {STATE_SCHEMA_VERSION}",
                    hint="tear down with the flowtruth version that brought the AP up",
                )
            return cls.model_validate(data)
        except (ValueError, ValidationError) as err:
            raise ApError(
                f"{path}: state file is damaged: {str(err).splitlines()[0]}",
                hint="inspect it by hand; remove it only after checking nft/sysctl/ethtool",
            ) from None


def lock_path(state_path: Path) -> Path:
    """The lock file serialising writers of one state file (``ap down`` and the supervisor)."""
    return state_path.parent / f".{state_path.name}.lock"


@contextlib.contextmanager
def state_lock(state_path: Path, timeout: float = 15.0) -> Iterator[None]:
    """Hold the state file's lock; :class:`ApError` when another process keeps it too long.

    The supervisor holds it while it restarts a daemon and ``ap down`` while it marks the
    AP as stopping, so a daemon is never restarted behind the back of a teardown.
    """
    path = lock_path(state_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ApError(
                        f"{state_path}: another flowtruth process has held its lock "
                        f"for {timeout:g} s",
                        hint="wait for it to finish (`flowtruth ap status` shows the supervisor)",
                    ) from None
                time.sleep(0.02)
        yield
    finally:
        os.close(fd)
