"""Bring the access point up, tear it down, report its status.

``ap_up`` records every change in the state file *before* making it; ``ap_down``
reads only the state file, so it restores exactly what was there, also after a crash.
Daemons too are recorded before they are spawned (their command line, which names our
config file, and dnsmasq's pid file): a daemon whose pid never reached the state file
(``ap up`` killed while it started) is found in ``/proc`` and stopped by ``ap_down``, and
one no state file knows of by the next ``ap_up`` (:func:`stop_leftovers`).
Both report progress as :class:`ApStepFinished` events to a ``sink``. ``ap_up`` can leave
a :class:`~ap_setup.supervise.Supervisor` restarting hostapd and dnsmasq (a thread, or a
detached process for the CLI); ``ap_down`` stops it before anything else.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ap_setup.capture import Capture, capture_files, stop_capture
from ap_setup.config import ApConfig
from ap_setup.render import (
    NatFamily,
    nft_tables,
    nm_dropin_path,
    render_dnsmasq,
    render_hostapd,
    render_iptables,
    render_nft,
    render_nm_unmanaged,
)
from ap_setup.runner import Runner, ShellResult, SubprocessRunner
from ap_setup.state import (
    ApState,
    DaemonHealth,
    LaunchRecord,
    ProcessRecord,
    SupervisorRecord,
    state_lock,
)
from ap_setup.supervise import (
    Supervisor,
    SupervisorSink,
    find_processes,
    is_alive,
    log_tail,
    start_daemon,
    start_supervisor_process,
    stop_daemon,
    stop_orphans,
    stop_supervisor,
    supervisor_alive,
)
from controller.errors import ApError, RootRequired

# ethtool -k long names of the offloads that change what a capture sees, and -K short names.
OFFLOADS = {
    "generic-receive-offload": "gro",
    "large-receive-offload": "lro",
    "tcp-segmentation-offload": "tso",
    "generic-segmentation-offload": "gso",
}


@dataclass(frozen=True)
class ApStepFinished:
    """One bring-up or teardown step is done."""

    step: str
    detail: str = ""


Sink = Callable[[ApStepFinished], None]


def _quiet(_event: ApStepFinished) -> None:
    pass


def require_root() -> None:
    """Raise :class:`RootRequired` unless running as root."""
    if os.geteuid() != 0:
        raise RootRequired(
            "the access point needs root (interfaces, nftables, sysctl, hostapd)",
            hint="run with sudo",
        )


def _must(res: ShellResult, what: str) -> ShellResult:
    if not res.ok:
        raise ApError(f"{what} failed: {res.describe()}")
    return res


def read_offloads(runner: Runner, interface: str) -> dict[str, tuple[bool, bool]]:
    """ethtool -k: long feature name -> (on, fixed) for the offloads we care about."""
    res = runner.run(["ethtool", "-k", interface])
    out: dict[str, tuple[bool, bool]] = {}
    if not res.ok:
        return out
    for line in res.stdout.splitlines():
        name, _, rest = line.strip().partition(":")
        if name in OFFLOADS:
            words = rest.split()
            out[name] = (bool(words) and words[0] == "on", "[fixed]" in rest)
    return out


def read_sysctl(runner: Runner, key: str) -> str | None:
    """Current value of a sysctl key (None when the key does not exist)."""
    res = runner.run(["sysctl", "-n", key])
    return res.stdout.strip() if res.ok else None


# Global switches whose write also overwrites per-interface values: switch -> (regex of
# the overwritten keys, the value a key gets when the switch is set to "0"/"1").
_SIDE_EFFECTS = {
    "net.ipv4.ip_forward": (
        r"^net\.ipv4\.conf\..*\.(forwarding|accept_redirects)$",
        {"forwarding": ("0", "1"), "accept_redirects": ("1", "0")},
    ),
    "net.ipv6.conf.all.forwarding": (
        r"^net\.ipv6\.conf\..*\.forwarding$",
        {"forwarding": ("0", "1")},
    ),
}


def overwritten_sysctls(runner: Runner, key: str, restore_to: str) -> dict[str, str]:
    """Values that writing ``key`` back to ``restore_to`` would not bring back.

    Writing ``net.ipv4.ip_forward`` or ``net.ipv6.conf.all.forwarding`` sets every
    interface's ``forwarding`` (and IPv4's ``all.accept_redirects``) too, so an interface
    that forwarded on its own before would lose it; these keys are restored after the switch.
    """
    if key not in _SIDE_EFFECTS or restore_to not in ("0", "1"):
        return {}
    pattern, result = _SIDE_EFFECTS[key]
    res = runner.run(["sysctl", "-a", "-r", pattern])
    out: dict[str, str] = {}
    for line in res.stdout.splitlines():
        name, sep, value = line.partition(" = ")
        name, value = name.strip(), value.strip()
        if not sep or name in (key, key.replace("ip_forward", "conf.all.forwarding")):
            continue
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "accept_redirects" and ".conf.all." not in name:
            continue  # only the global accept_redirects follows ip_forward
        if leaf in result and value != result[leaf][int(restore_to)]:
            out[name] = value
    return out


def global_ipv6(runner: Runner, interface: str) -> list[str]:
    """Global (non-temporary) IPv6 addresses of an interface, as ``addr/prefixlen``."""
    res = runner.run(["ip", "-j", "-6", "addr", "show", "dev", interface, "scope", "global"])
    if not res.ok or not res.stdout.strip():
        return []
    out = []
    for link in json.loads(res.stdout):
        for a in link.get("addr_info", []):
            if a.get("family") == "inet6" and not a.get("temporary"):
                out.append(f"{a['local']}/{a['prefixlen']}")
    return out


def wait_ipv6_ready(runner: Runner, interface: str, timeout: float = 3.0) -> bool:
    """Wait until no IPv6 address of the interface is tentative (DAD done); True if so."""
    deadline = time.monotonic() + timeout
    while True:
        res = runner.run(["ip", "-6", "-o", "addr", "show", "dev", interface, "tentative"])
        if not res.ok or not res.stdout.strip():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)


def choose_firewall(cfg: ApConfig, runner: Runner) -> Literal["nft", "iptables"]:
    """``nft`` or ``iptables``, following ``cfg.firewall`` and what is installed."""
    if cfg.firewall in ("auto", "nft") and runner.which("nft"):
        if runner.run(["nft", "list", "tables"]).ok:
            return "nft"
    if cfg.firewall == "nft":
        raise ApError(
            "nftables is not usable here", hint="install nftables or set firewall: iptables"
        )
    if runner.which("iptables"):
        return "iptables"
    raise ApError("neither nft nor iptables is installed", hint="apt-get install nftables")


def required_binaries(cfg: ApConfig) -> list[str]:
    """Programs ``ap up`` cannot do without for this config."""
    need = ["ip", "sysctl", "dnsmasq"]
    if cfg.radio:
        need.append("hostapd")
    if cfg.disable_offloads:
        need.append("ethtool")
    return need


def nm_running(cfg: ApConfig, runner: Runner) -> bool:
    # NetworkManager only manages the root namespace.
    if cfg.netns or runner.which("nmcli") is None:
        return False
    res = runner.run(["nmcli", "-t", "-f", "RUNNING", "general"])
    return res.ok and res.stdout.strip() == "running"


def nm_device_state(runner: Runner, interface: str) -> str | None:
    """NetworkManager's state word for the interface (e.g. ``unmanaged``), None if unknown."""
    res = runner.run(["nmcli", "-t", "-f", "DEVICE,STATE", "device", "status"])
    if not res.ok:
        return None
    for line in res.stdout.splitlines():
        dev, _, state = line.rpartition(":")
        if dev.replace("\\:", ":") == interface:
            return state
    return None


def daemon_launches(cfg: ApConfig, capture_dir: Path | None = None) -> dict[str, LaunchRecord]:
    """The daemons ``ap up`` starts for ``cfg``, by name: command line and pid file.

    Each command line names a file in the AP's work directory (or the capture directory),
    which is how a daemon left behind by a killed ``ap up`` is recognised.
    """
    work = cfg.work_dir
    out: dict[str, LaunchRecord] = {}
    if cfg.radio:
        out["hostapd"] = LaunchRecord(name="hostapd",
                                      argv=["hostapd", "-t", str(work / "hostapd.conf")])
    out["dnsmasq"] = LaunchRecord(
        name="dnsmasq",
        argv=["dnsmasq", "--keep-in-foreground", f"--conf-file={work / 'dnsmasq.conf'}"],
        pid_file=str(work / "dnsmasq.pid"),
    )  # fmt: skip
    if capture_dir is not None:
        cap = Capture(cfg.capture, cfg.interface, Path(capture_dir), SubprocessRunner(cfg.netns))
        out["capture"] = LaunchRecord(name="capture", argv=cap.argv())
    return out


def _orphan_signal(name: str) -> int:
    return signal.SIGINT if name == "capture" else signal.SIGTERM  # a capture flushes on INT


def stop_leftovers(
    launches: dict[str, LaunchRecord], netns: str | None, sink: Sink = _quiet
) -> list[str]:
    """Stop processes in ``netns`` running one of ``launches``' command lines; one line
    per process stopped."""
    done = []
    for name, launch in launches.items():
        for pid in stop_orphans(launch, sig=_orphan_signal(name), netns=netns):
            line = f"stopped a leftover {name} (pid {pid}) of an interrupted `ap up`"
            sink(ApStepFinished(name, line))
            done.append(line)
    return done


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` with mode 0600 from its first byte (temp file, rename)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def ap_up(
    cfg: ApConfig,
    runner: Runner | None = None,
    *,
    sink: Sink = _quiet,
    capture_dir: Path | None = None,
    check_root: bool = True,
    supervise: Literal["thread", "process"] | None = None,
    supervisor_sink: SupervisorSink | None = None,
) -> ApState:
    """Bring the AP up; on failure undo what was done and raise :class:`ApError`.

    ``supervise="thread"`` leaves a :class:`~ap_setup.supervise.Supervisor` thread in this
    program (events to ``supervisor_sink``), ``"process"`` a detached supervisor process;
    either follows ``cfg.supervision`` and is stopped by :func:`ap_down`.
    """
    if check_root:
        require_root()
    runner = runner or SubprocessRunner(cfg.netns)
    path = cfg.state_path
    if ApState.load(path) is not None:
        raise ApError(
            f"an AP on {cfg.interface} is already up (state file {path})",
            hint="run `flowtruth ap down` first",
        )
    missing = [b for b in required_binaries(cfg) if runner.which(b) is None]
    if missing:
        raise ApError(f"missing programs: {', '.join(missing)}", hint="run `flowtruth ap check`")
    if not runner.run(["ip", "link", "show", "dev", cfg.interface]).ok:
        raise ApError(
            f"interface {cfg.interface} does not exist"
            + (f" in namespace {cfg.netns}" if cfg.netns else ""),
            hint="`ip link` lists the interfaces; set `interface` in the AP config",
        )
    if cfg.radio:
        cfg = cfg.with_passphrase()
    firewall = choose_firewall(cfg, runner)
    # Daemons a killed `ap up` left running with our config files (no state file knows them):
    # they would hold the DHCP/DNS ports and the radio.
    stop_leftovers(daemon_launches(cfg, capture_dir), cfg.netns, sink)

    work = cfg.work_dir
    work.mkdir(parents=True, exist_ok=True)
    (work / "dnsmasq.conf").write_text(render_dnsmasq(cfg))
    if cfg.radio:
        _write_private(work / "hostapd.conf", render_hostapd(cfg))
    state = ApState(
        interface=cfg.interface,
        netns=cfg.netns,
        work_dir=str(work),
        ssid=cfg.ssid if cfg.radio else None,
        passphrase=cfg.passphrase if cfg.radio else None,
    )
    state.save(path)
    sink(ApStepFinished("rendered", f"configs in {work}"))
    try:
        _bring_up(cfg, runner, state, path, firewall, sink, capture_dir)
    except BaseException as err:
        _undo(err, path, runner, sink)
        raise
    state.status = "up"
    state.save(path)
    if supervise is not None:
        try:
            rec = _start_supervisor(cfg, runner, supervise, supervisor_sink)
        except BaseException as err:
            _undo(err, path, runner, sink)
            raise
        sink(ApStepFinished("supervisor", f"{rec.kind}, pid {rec.pid}, log {rec.log}"))
        state = ApState.load(path) or state
    sink(ApStepFinished("up", f"{cfg.interface} at {cfg.address}"))
    return state


def _undo(err: BaseException, path: Path, runner: Runner, sink: Sink) -> None:
    """Tear down a half-done bring-up; an :class:`ApError` naming both if that fails too."""
    sink(ApStepFinished("failed", f"{err}; undoing"))
    try:
        ap_down(path, runner, sink=sink)
    except ApError as undo_err:
        raise ApError(f"{err}; undo also failed: {undo_err}") from None


def _no_events(_event: object) -> None:
    pass


def _start_supervisor(
    cfg: ApConfig,
    runner: Runner,
    kind: Literal["thread", "process"],
    sink: SupervisorSink | None,
) -> SupervisorRecord:
    if kind == "process":
        return start_supervisor_process(cfg.state_path, cfg.supervision)
    sup = Supervisor(cfg.state_path, runner, policy=cfg.supervision, sink=sink or _no_events)
    sup.start()
    assert sup.record is not None
    return sup.record


def _bring_up(
    cfg: ApConfig,
    runner: Runner,
    state: ApState,
    path: Path,
    firewall: Literal["nft", "iptables"],
    sink: Sink,
    capture_dir: Path | None,
) -> None:
    iface = cfg.interface
    if cfg.radio and runner.which("rfkill"):
        state.rfkill_unblocked = True
        state.save(path)
        runner.run(["rfkill", "unblock", "wifi"])
        sink(ApStepFinished("rfkill", "wifi unblocked"))

    if nm_running(cfg, runner):
        dropin = nm_dropin_path(cfg)
        before = nm_device_state(runner, iface)
        state.nm_managed_before = before not in (None, "unmanaged")
        state.nm_dropin = str(dropin)
        state.nm_dropin_previous = dropin.read_text() if dropin.exists() else None
        state.save(path)
        dropin.parent.mkdir(parents=True, exist_ok=True)
        dropin.write_text(render_nm_unmanaged(cfg))
        runner.run(["nmcli", "general", "reload", "conf"])
        _must(runner.run(["nmcli", "device", "set", iface, "managed", "no"]), "nmcli device set")
        sink(ApStepFinished("networkmanager", f"{iface} unmanaged (was {before})"))

    info = json.loads(
        _must(runner.run(["ip", "-j", "addr", "show", "dev", iface]), "ip addr").stdout
    )[0]
    state.link_was_up = "UP" in info.get("flags", [])
    have = {f"{a['local']}/{a['prefixlen']}" for a in info.get("addr_info", [])}
    if str(cfg.address) not in have:
        state.address_added = str(cfg.address)
    state.save(path)
    if state.address_added:
        _must(runner.run(["ip", "addr", "add", str(cfg.address), "dev", iface]), "ip addr add")
    _must(runner.run(["ip", "link", "set", "dev", iface, "up"]), "ip link set up")
    sink(ApStepFinished("address", f"{cfg.address} on {iface}"))

    if cfg.disable_offloads:
        current = read_offloads(runner, iface)
        state.offloads_before = {n: on for n, (on, fixed) in current.items() if on and not fixed}
        state.save(path)
        for name in state.offloads_before:
            _must(
                runner.run(["ethtool", "-K", iface, OFFLOADS[name], "off"]), f"ethtool {name} off"
            )
        sink(
            ApStepFinished(
                "offloads", "off: " + (", ".join(state.offloads_before) or "none were on")
            )
        )

    wanted = {"net.ipv4.ip_forward": "1"}
    if not cfg.ipv6_ra:
        wanted[f"net.ipv6.conf.{iface}.disable_ipv6"] = "1"
    else:
        wanted[f"net.ipv6.conf.{iface}.disable_ipv6"] = "0"
        wanted["net.ipv6.conf.all.forwarding"] = "1"
        # A forwarding host ignores router advertisements unless accept_ra is 2: keep the
        # uplink's own IPv6 default route.
        if cfg.uplink and read_sysctl(runner, f"net.ipv6.conf.{cfg.uplink}.accept_ra") == "1":
            wanted[f"net.ipv6.conf.{cfg.uplink}.accept_ra"] = "2"
    for key, value in wanted.items():
        before = read_sysctl(runner, key)
        if before is None or before == value:
            continue
        state.sysctl_before[key] = before
        state.sysctl_before.update(overwritten_sysctls(runner, key, before))
        state.save(path)
        _must(runner.run(["sysctl", "-q", "-w", f"{key}={value}"]), f"sysctl {key}")
    sink(ApStepFinished("sysctl", ", ".join(f"{k}={v}" for k, v in wanted.items())))

    have6: list[str] = []
    if cfg.ipv6_ra:
        have6 = global_ipv6(runner, iface)
        if cfg.ipv6_address is not None and str(cfg.ipv6_address) not in have6:
            state.address6_added = str(cfg.ipv6_address)
            state.save(path)
            # nodad: dnsmasq builds its prefix only from a non-tentative address
            _must(
                runner.run(["ip", "-6", "addr", "add", str(cfg.ipv6_address), "dev", iface,
                            "nodad"]),
                "ip -6 addr add",
            )  # fmt: skip
        elif not have6:
            raise ApError(
                f"ipv6_ra is on but {iface} has no global IPv6 address to advertise a prefix from",
                hint="set ipv6_address in the AP config, e.g. fd00:f10e:1::1/64",
            )
        sink(ApStepFinished("ipv6", f"{cfg.ipv6_address or have6[0]} on {iface}, forwarding on"))

    state.firewall = firewall
    if firewall == "nft":
        family: NatFamily = "inet"
        if not runner.run(["nft", "-c", "-f", "-"], input=render_nft(cfg, "inet", have6)).ok:
            family = "ip"  # kernels before 5.2 have no NAT in the inet family
        state.nft_tables = nft_tables(family)
        state.save(path)
        _must(runner.run(["nft", "-f", "-"], input=render_nft(cfg, family, have6)), "nft -f")
        sink(ApStepFinished("nat", "nftables: " + ", ".join(state.nft_tables)))
    else:
        plan = render_iptables(cfg, addresses6=have6)
        state.iptables_down = plan.down
        state.iptables_new_tables = _iptables_nft_tables_missing(runner, cfg.ipv6_ra)
        state.save(path)
        for argv in plan.up:
            _must(runner.run(argv), "iptables")
        chains = "FT-FORWARD, FT-POSTROUTING" + (", FT-INPUT" if cfg.protect_host else "")
        sink(ApStepFinished("nat", f"iptables chains {chains}"))

    work = Path(state.work_dir)
    launches = daemon_launches(cfg, capture_dir)
    settle = cfg.supervision.settle
    if cfg.radio:
        _record_launch(state, path, launches["hostapd"])
        rec = start_daemon(runner, "hostapd", launches["hostapd"].argv, work / "hostapd.log",
                           settle=settle)  # fmt: skip
        state.processes["hostapd"] = rec
        state.save(path)
        _wait_for_log(rec, "AP-ENABLED", 10.0)
        sink(ApStepFinished("hostapd", f"pid {rec.pid}, SSID {cfg.ssid!r}"))
    if cfg.ipv6_ra and not wait_ipv6_ready(runner, iface):
        sink(ApStepFinished("ipv6", "addresses still tentative; router advertisements follow"))
    _record_launch(state, path, launches["dnsmasq"])
    rec = start_daemon(runner, "dnsmasq", launches["dnsmasq"].argv, work / "dnsmasq.out",
                       settle=settle)  # fmt: skip
    state.processes["dnsmasq"] = rec
    state.save(path)
    sink(ApStepFinished("dnsmasq", f"pid {rec.pid}, log {work / 'dnsmasq.log'}"))

    if capture_dir is not None:
        cap = Capture(cfg.capture, iface, Path(capture_dir), runner)
        state.capture_dir = str(capture_dir)
        _record_launch(state, path, LaunchRecord(name="capture", argv=cap.argv()))
        state.processes["capture"] = cap.start()
        state.save(path)
        sink(ApStepFinished("capture", f"{cfg.capture.tool} into {capture_dir}"))


def _record_launch(state: ApState, path: Path, launch: LaunchRecord) -> None:
    """Note a daemon in the state file before it is spawned (and drop its stale pid file),
    so ``ap down`` finds it even if we are killed before its pid is recorded."""
    state.launched[launch.name] = launch
    state.save(path)
    if launch.pid_file:
        Path(launch.pid_file).unlink(missing_ok=True)


def _iptables_nft_tables_missing(runner: Runner, ipv6: bool = False) -> list[str]:
    """The tables iptables-nft (and ip6tables-nft, with ``ipv6``) will create for our
    chains because they do not exist yet."""
    version = runner.run(["iptables", "-V"])
    if "nf_tables" not in version.stdout or runner.which("nft") is None:
        return []
    listing = runner.run(["nft", "list", "tables"])
    if not listing.ok:
        return []
    have = {line.removeprefix("table ").strip() for line in listing.stdout.splitlines()}
    ours = ("ip filter", "ip nat", *(("ip6 filter",) if ipv6 else ()))
    return [t for t in ours if t not in have]


def _has_rules(listing: str) -> bool:
    """True when an ``nft list table`` output holds anything besides empty chains."""
    for line in listing.splitlines():
        word = line.strip().split(" ", 1)[0]
        if word and word not in ("table", "chain", "type", "}", "policy"):
            return True
    return False


def _wait_for_log(rec: ProcessRecord, marker: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = Path(rec.log)
        if log.exists() and marker in log.read_text(errors="replace"):
            return
        if not is_alive(rec):
            raise ApError(
                f"{rec.name} stopped: {log_tail(Path(rec.log))}", hint=f"full log: {rec.log}"
            )
        time.sleep(0.1)
    raise ApError(f"{rec.name} did not report {marker} within {timeout:g} s", hint=f"see {rec.log}")


def _gone(res: ShellResult) -> bool:
    """The undo failed only because the thing is already gone."""
    text = (res.stderr + res.stdout).lower()
    return any(
        s in text
        for s in (
            "no such file",
            "no such device",
            "cannot find device",
            "not found",
            "does not exist",
            "no chain/target/match",
            "does a matching rule exist",
            "cannot assign requested address",
        )
    )


def ap_down(
    state_path: Path,
    runner: Runner | None = None,
    *,
    sink: Sink = _quiet,
) -> ApState | None:
    """Undo everything the state file records; None when nothing was up. Idempotent."""
    with state_lock(state_path):
        state = ApState.load(state_path)
        if state is None:
            sink(ApStepFinished("down", "nothing to do (no state file)"))
            return None
        runner = runner or SubprocessRunner(state.netns)
        if runner.netns != state.netns:
            raise ApError(f"state file is for namespace {state.netns}, runner for {runner.netns}")
        # Under the lock: from here on no supervisor restarts anything.
        state.status = "stopping"
        state.save(state_path)
    done = stop_supervisor(state_path, state.supervisor)
    if done:
        sink(ApStepFinished("supervisor", done))
    state.supervisor = None
    failures: list[str] = []
    iface = state.interface

    if "capture" in state.processes:
        rec = state.processes["capture"]
        stats = stop_capture(rec)
        if state.capture_dir:
            out = Path(state.capture_dir) / "capture-stats.json"
            try:
                out.write_text(json.dumps(stats, indent=2) + "\n")
            except OSError as err:  # keep restoring the system; report at the end
                failures.append(f"{out}: {err.strerror}")
        sink(ApStepFinished("capture", f"stopped: {stats}"))
    for name in ("hostapd", "dnsmasq"):
        if name in state.processes:
            ran = stop_daemon(state.processes[name])
            sink(ApStepFinished(name, "stopped" if ran else "was not running"))
    # Daemons spawned but never recorded (`ap up` or a supervisor killed in between).
    stop_leftovers(state.launched, state.netns, sink)
    state.processes = {}
    state.launched = {}
    state.save(state_path)

    if state.address6_added:
        res = runner.run(["ip", "-6", "addr", "del", state.address6_added, "dev", iface])
        if not res.ok and not _gone(res):
            failures.append(res.describe())

    for table in state.nft_tables:
        res = runner.run(["nft", "delete", "table", *table.split()])
        if not res.ok and not _gone(res):
            failures.append(res.describe())
    for argv in state.iptables_down:
        res = runner.run(argv)
        if not res.ok and not _gone(res):
            failures.append(res.describe())
    for table in state.iptables_new_tables:
        # iptables-nft leaves the tables it created; remove them only if nothing else uses them.
        listing = runner.run(["nft", "list", "table", *table.split()])
        if listing.ok and not _has_rules(listing.stdout):
            runner.run(["nft", "delete", "table", *table.split()])
    if state.firewall:
        sink(ApStepFinished("nat", "removed"))

    for key, value in state.sysctl_before.items():
        res = runner.run(["sysctl", "-q", "-w", f"{key}={value}"])
        if not res.ok and not _gone(res):
            failures.append(res.describe())
    if state.sysctl_before:
        sink(
            ApStepFinished(
                "sysctl",
                "restored " + ", ".join(f"{k}={v}" for k, v in state.sysctl_before.items()),
            )
        )

    for name in state.offloads_before:
        res = runner.run(["ethtool", "-K", iface, OFFLOADS[name], "on"])
        if not res.ok and not _gone(res):
            failures.append(res.describe())
    if state.offloads_before:
        sink(ApStepFinished("offloads", "restored " + ", ".join(state.offloads_before)))

    if state.address_added:
        res = runner.run(["ip", "addr", "del", state.address_added, "dev", iface])
        if not res.ok and not _gone(res):
            failures.append(res.describe())
    if state.link_was_up is False:
        res = runner.run(["ip", "link", "set", "dev", iface, "down"])
        if not res.ok and not _gone(res):
            failures.append(res.describe())
    sink(ApStepFinished("address", f"{iface} as before"))

    if state.nm_dropin:
        dropin = Path(state.nm_dropin)
        try:
            if state.nm_dropin_previous is None:
                dropin.unlink(missing_ok=True)
            else:
                dropin.write_text(state.nm_dropin_previous)
        except OSError as err:
            failures.append(f"{dropin}: {err.strerror}")
        runner.run(["nmcli", "general", "reload", "conf"])
        if state.nm_managed_before:
            res = runner.run(["nmcli", "device", "set", iface, "managed", "yes"])
            if not res.ok and not _gone(res):
                failures.append(res.describe())
        sink(
            ApStepFinished(
                "networkmanager", "handed back" if state.nm_managed_before else "drop-in removed"
            )
        )

    if failures:
        state.save(state_path)
        raise ApError(
            "teardown incomplete: " + "; ".join(failures),
            hint=f"fix the cause and run `flowtruth ap down` again (state kept in {state_path})",
        )
    state_path.unlink(missing_ok=True)
    sink(ApStepFinished("down", f"{iface} restored"))
    return state


@dataclass(frozen=True)
class Client:
    """A phone that holds a DHCP lease."""

    mac: str
    ip: str
    name: str
    expires: int


@dataclass
class ApStatus:
    """What ``flowtruth ap status`` shows."""

    up: bool
    state: ApState | None = None
    daemons: dict[str, bool] = field(default_factory=dict)
    """Daemon name -> running."""
    clients: list[Client] = field(default_factory=list)
    capture_files: list[Path] = field(default_factory=list)
    supervisor: SupervisorRecord | None = None
    supervisor_alive: bool = False
    health: dict[str, DaemonHealth] = field(default_factory=dict)
    """Restarts per daemon (only daemons the supervisor restarted or gave up on)."""
    leftovers: dict[str, list[int]] = field(default_factory=dict)
    """Daemon name -> pids running its command line that the state file does not record
    (left by a killed ``ap up`` or supervisor; ``ap down`` stops them)."""


def read_leases(path: Path) -> list[Client]:
    """Clients from a dnsmasq lease file (``expiry mac ip name client-id`` per line)."""
    clients: list[Client] = []
    try:
        text = path.read_text()
    except OSError:
        return clients
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[0].isdigit():
            clients.append(
                Client(
                    mac=parts[1],
                    ip=parts[2],
                    name="" if parts[3] == "*" else parts[3],
                    expires=int(parts[0]),
                )
            )
    return clients


def ap_status(cfg: ApConfig) -> ApStatus:
    """The AP's state: daemons alive, clients with leases, capture files."""
    state = ApState.load(cfg.state_path)
    if state is None:
        return ApStatus(up=False)
    status = ApStatus(up=state.status == "up", state=state)
    status.daemons = {name: is_alive(rec) for name, rec in state.processes.items()}
    status.supervisor = state.supervisor
    status.supervisor_alive = supervisor_alive(state.supervisor)
    status.health = dict(state.health)
    for name, launch in state.launched.items():
        rec = state.processes.get(name)
        extra = [pid for pid in find_processes(launch.argv, launch.pid_file, state.netns)
                 if rec is None or pid != rec.pid]  # fmt: skip
        if extra:
            status.leftovers[name] = extra
    status.clients = read_leases(Path(state.work_dir) / "dnsmasq.leases")
    if state.capture_dir:
        status.capture_files = capture_files(Path(state.capture_dir))
    return status
