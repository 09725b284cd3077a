"""``ap up``/``ap down`` against a recording runner: what is recorded, in which order, and undone.

The same flows run against the real kernel in ``test_ap_netns.py``; here the radio,
NetworkManager and rfkill paths (absent on a Wi-Fi-less CI machine) are covered.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

import ap_setup.lifecycle as lifecycle
from ap_setup.config import ApConfig
from ap_setup.lifecycle import ap_down, ap_status, ap_up, read_leases, read_offloads
from ap_setup.runner import RecordingRunner, ShellResult, SubprocessRunner
from ap_setup.state import ApState
from controller.errors import ApError, RootRequired

ETHTOOL_K = """\
Features for wlan0:
rx-checksumming: on [fixed]
tcp-segmentation-offload: off
\ttx-tcp-segmentation: off [fixed]
generic-segmentation-offload: on
generic-receive-offload: on
large-receive-offload: off [fixed]
"""


def ok(stdout: str = "") -> ShellResult:
    return ShellResult((), 0, stdout, "")


def fail(stderr: str, code: int = 1) -> ShellResult:
    return ShellResult((), code, "", stderr)


def make_runner(**extra: ShellResult) -> RecordingRunner:
    """A Wi-Fi host with NetworkManager managing wlan0, IP forwarding off."""
    responses = {
        ("nmcli", "-t", "-f", "RUNNING", "general"): ok("running\n"),
        ("nmcli", "-t", "-f", "DEVICE,STATE", "device", "status"): ok(
            "eth0:connected\nwlan0:disconnected\n"
        ),
        ("ip", "-j", "addr", "show"): ok(
            '[{"ifname":"wlan0","flags":["BROADCAST","MULTICAST"],"addr_info":[]}]'
        ),
        ("ethtool", "-k"): ok(ETHTOOL_K),
        ("sysctl", "-n", "net.ipv4.ip_forward"): ok("0\n"),
        ("sysctl", "-n", "net.ipv6.conf.wlan0.disable_ipv6"): ok("0\n"),
        **{tuple(k.split()): v for k, v in extra.items()},
    }
    return RecordingRunner(responses=responses, spawn_logs={"hostapd": "wlan0: AP-ENABLED\n"})


@pytest.fixture
def cfg(tmp_path: Path) -> ApConfig:
    return ApConfig(
        interface="wlan0",
        uplink="eth0",
        country_code="DE",
        state_dir=tmp_path / "state",
        nm_conf_dir=tmp_path / "nm",
    )


def commands(runner: RecordingRunner) -> list[str]:
    return [" ".join(c) for c in runner.calls]


def test_up_records_everything_before_changing_it(cfg: ApConfig) -> None:
    runner = make_runner()
    state = ap_up(cfg, runner, check_root=False)
    saved = json.loads(cfg.state_path.read_text())
    assert saved["status"] == "up"
    assert saved["sysctl_before"] == {
        "net.ipv4.ip_forward": "0",
        "net.ipv6.conf.wlan0.disable_ipv6": "0",
    }
    # Only offloads that were on and changeable; fixed ones are left alone.
    assert saved["offloads_before"] == {
        "generic-segmentation-offload": True,
        "generic-receive-offload": True,
    }
    assert saved["nm_managed_before"] is True
    assert saved["address_added"] == "192.168.50.1/24" and saved["link_was_up"] is False
    assert saved["nft_tables"] == ["inet flowtruth"]
    assert set(saved["processes"]) == {"hostapd", "dnsmasq"}
    assert state.passphrase and saved["passphrase"] == state.passphrase
    assert stat.S_IMODE(cfg.state_path.stat().st_mode) == 0o600
    assert [p.name for p in cfg.state_path.parent.iterdir() if p.name.startswith(".state-")] == []

    dropin = cfg.nm_conf_dir / "99-flowtruth-wlan0.conf"
    assert "unmanaged-devices+=interface-name:wlan0" in dropin.read_text()
    assert "wpa_passphrase=" + state.passphrase in (cfg.work_dir / "hostapd.conf").read_text()

    cmds = commands(runner)
    order = [
        "rfkill unblock wifi",
        "nmcli device set wlan0 managed no",
        "ip addr add 192.168.50.1/24 dev wlan0",
        "ethtool -K wlan0 gso off",
        "ethtool -K wlan0 gro off",
        "sysctl -q -w net.ipv4.ip_forward=1",
        "sysctl -q -w net.ipv6.conf.wlan0.disable_ipv6=1",
        "nft -f -",
    ]
    assert [cmds.index(c) for c in order] == sorted(cmds.index(c) for c in order)
    assert "ethtool -K wlan0 lro off" not in cmds and "ethtool -K wlan0 tso off" not in cmds
    assert [s[0] for s in runner.spawned] == ["hostapd", "dnsmasq"]
    nft_script = runner.inputs[cmds.index("nft -f -")]
    assert nft_script is not None and 'oifname "eth0" masquerade' in nft_script


def test_down_undoes_exactly_what_the_state_file_says(cfg: ApConfig) -> None:
    ap_up(cfg, make_runner(), check_root=False)
    runner = RecordingRunner()
    events = []
    ap_down(cfg.state_path, runner, sink=events.append)
    cmds = commands(runner)
    assert cmds == [
        "nft delete table inet flowtruth",
        "sysctl -q -w net.ipv4.ip_forward=0",
        "sysctl -q -w net.ipv6.conf.wlan0.disable_ipv6=0",
        "ethtool -K wlan0 gso on",
        "ethtool -K wlan0 gro on",
        "ip addr del 192.168.50.1/24 dev wlan0",
        "ip link set dev wlan0 down",
        "nmcli general reload conf",
        "nmcli device set wlan0 managed yes",
    ]
    assert not (cfg.nm_conf_dir / "99-flowtruth-wlan0.conf").exists()
    assert not cfg.state_path.exists()
    assert events[-1].step == "down"
    assert ap_down(cfg.state_path, RecordingRunner()) is None


def test_down_restores_a_dropin_that_was_there_before(cfg: ApConfig) -> None:
    dropin = cfg.nm_conf_dir / "99-flowtruth-wlan0.conf"
    dropin.parent.mkdir(parents=True)
    dropin.write_text("[keyfile]\nunmanaged-devices+=interface-name:wlan9\n")
    ap_up(cfg, make_runner(), check_root=False)
    assert "wlan0" in dropin.read_text()
    ap_down(cfg.state_path, RecordingRunner())
    assert dropin.read_text() == "[keyfile]\nunmanaged-devices+=interface-name:wlan9\n"


def test_a_failed_step_undoes_the_steps_before_it(cfg: ApConfig) -> None:
    runner = make_runner(**{"nft -f -": fail("Error: Could not process rule: No such file")})
    with pytest.raises(ApError, match="nft -f failed"):
        ap_up(cfg, runner, check_root=False)
    cmds = commands(runner)
    assert "sysctl -q -w net.ipv4.ip_forward=0" in cmds
    assert "ethtool -K wlan0 gro on" in cmds
    assert "nmcli device set wlan0 managed yes" in cmds
    assert not runner.spawned
    assert not cfg.state_path.exists()


def test_incomplete_teardown_keeps_the_state_file_for_a_retry(cfg: ApConfig) -> None:
    ap_up(cfg, make_runner(), check_root=False)
    broken = RecordingRunner(
        responses={("ethtool",): fail("Cannot change generic-receive-offload")}
    )
    with pytest.raises(ApError, match="teardown incomplete") as info:
        ap_down(cfg.state_path, broken)
    assert "ap down" in (info.value.hint or "")
    st = ApState.load(cfg.state_path)
    assert st is not None and st.status == "stopping" and st.processes == {}
    ap_down(cfg.state_path, RecordingRunner())
    assert not cfg.state_path.exists()


def test_things_already_gone_do_not_fail_teardown(cfg: ApConfig) -> None:
    ap_up(cfg, make_runner(), check_root=False)
    gone = RecordingRunner(
        responses={
            ("nft", "delete"): fail("Error: No such file or directory"),
            ("ip", "addr", "del"): fail("RTNETLINK answers: Cannot assign requested address"),
        }
    )
    ap_down(cfg.state_path, gone)
    assert not cfg.state_path.exists()


def test_up_refuses_when_already_up_or_not_root(cfg: ApConfig, monkeypatch) -> None:
    ap_up(cfg, make_runner(), check_root=False)
    with pytest.raises(ApError, match="already up"):
        ap_up(cfg, make_runner(), check_root=False)
    monkeypatch.setattr(lifecycle.os, "geteuid", lambda: 1000)
    with pytest.raises(RootRequired):
        ap_up(cfg, make_runner())


def test_up_names_missing_programs_and_interfaces(cfg: ApConfig) -> None:
    runner = make_runner()
    runner.missing = {"hostapd"}
    with pytest.raises(ApError, match="missing programs: hostapd"):
        ap_up(cfg, runner, check_root=False)
    runner = make_runner(**{"ip link show dev wlan0": fail('Device "wlan0" does not exist.')})
    with pytest.raises(ApError, match="interface wlan0 does not exist"):
        ap_up(cfg, runner, check_root=False)
    assert not cfg.state_path.exists()


def test_virtual_lab_config_skips_radio_and_networkmanager(cfg: ApConfig) -> None:
    lab = cfg.model_copy(update={"radio": False, "netns": "ftap-x"})
    runner = make_runner()
    runner.netns = "ftap-x"
    state = ap_up(lab, runner, check_root=False)
    cmds = commands(runner)
    assert not any(c.startswith(("rfkill", "nmcli")) for c in cmds)
    assert [s[0] for s in runner.spawned] == ["dnsmasq"]
    assert state.ssid is None and state.passphrase is None
    with pytest.raises(ApError, match="namespace"):
        ap_down(lab.state_path, RecordingRunner())  # a runner for the wrong namespace


def test_iptables_fallback_when_nft_is_missing(cfg: ApConfig) -> None:
    runner = make_runner(**{"iptables -V": ok("iptables v1.8.9 (legacy)")})
    runner.missing = {"nft"}
    ap_up(cfg, runner, check_root=False)
    st = ApState.load(cfg.state_path)
    assert st is not None and st.firewall == "iptables" and st.nft_tables == []
    assert any("FT-POSTROUTING" in c and "-N" in c for c in commands(runner))
    down = RecordingRunner()
    ap_down(cfg.state_path, down)
    assert commands(down)[:6] == [
        "iptables -w -t filter -D INPUT -j FT-INPUT",
        "iptables -w -t filter -F FT-INPUT",
        "iptables -w -t filter -X FT-INPUT",
        "iptables -w -t filter -D FORWARD -j FT-FORWARD",
        "iptables -w -t filter -F FT-FORWARD",
        "iptables -w -t filter -X FT-FORWARD",
    ]


def test_status_lists_clients_from_the_lease_file(cfg: ApConfig) -> None:
    assert ap_status(cfg).up is False
    ap_up(cfg, make_runner(), check_root=False)
    (cfg.work_dir / "dnsmasq.leases").write_text(
        "1764400000 aa:bb:cc:00:00:01 192.168.50.11 pixel-7 01:aa:bb:cc:00:00:01\n"
        "1764400001 aa:bb:cc:00:00:02 192.168.50.120 * *\n"
    )
    st = ap_status(cfg)
    assert st.up
    assert [(c.mac, c.ip, c.name) for c in st.clients] == [
        ("aa:bb:cc:00:00:01", "192.168.50.11", "pixel-7"),
        ("aa:bb:cc:00:00:02", "192.168.50.120", ""),
    ]
    assert read_leases(cfg.work_dir / "missing") == []


def test_read_offloads_parses_fixed_flags() -> None:
    runner = make_runner()
    assert read_offloads(runner, "wlan0") == {
        "tcp-segmentation-offload": (False, False),
        "generic-segmentation-offload": (True, False),
        "generic-receive-offload": (True, False),
        "large-receive-offload": (False, True),
    }


def test_damaged_state_file_is_a_known_error(cfg: ApConfig) -> None:
    cfg.state_path.parent.mkdir(parents=True)
    cfg.state_path.write_text("{not json")
    with pytest.raises(ApError, match="damaged"):
        ap_down(cfg.state_path, RecordingRunner())
    cfg.state_path.write_text('{"schema_version": 99}')
    with pytest.raises(ApError, match="schema_version"):
        ApState.load(cfg.state_path)


def test_subprocess_runner_reports_missing_programs_and_timeouts() -> None:
    r = SubprocessRunner()
    res = r.run(["flowtruth-no-such-program"])
    assert res.returncode == 127 and not res.ok
    assert r.run(["sleep", "5"], timeout=0.2).returncode == 124
    assert r.run(["cat"], input="hi").stdout == "hi"


def test_down_after_the_interface_vanished(cfg: ApConfig) -> None:
    """A USB Wi-Fi stick unplugged while up: teardown restores the rest and succeeds."""
    ap_up(cfg, make_runner(), check_root=False)
    unplugged = RecordingRunner(
        responses={
            ("ethtool",): fail("Cannot get device feature names: No such device"),
            ("ip", "addr", "del"): fail('Cannot find device "wlan0"'),
            ("ip", "link", "set"): fail('Cannot find device "wlan0"'),
            ("sysctl", "-q", "-w", "net.ipv6.conf.wlan0.disable_ipv6=0"): fail(
                "sysctl: cannot stat /proc/sys/net/ipv6/conf/wlan0/disable_ipv6: No such file or directory"
            ),
            ("nmcli", "device", "set"): fail("Error: Device 'wlan0' not found."),
        }
    )
    ap_down(cfg.state_path, unplugged)
    assert "sysctl -q -w net.ipv4.ip_forward=0" in commands(unplugged)
    assert not cfg.state_path.exists()


SYSCTL_A = {
    r"^net\.ipv4\.conf\..*\.(forwarding|accept_redirects)$": (
        "net.ipv4.conf.all.accept_redirects = 1\nnet.ipv4.conf.all.forwarding = 0\n"
        "net.ipv4.conf.eth0.accept_redirects = 1\nnet.ipv4.conf.eth0.forwarding = 1\n"
        "net.ipv4.conf.wlan0.forwarding = 0\n"
    ),
    r"^net\.ipv6\.conf\..*\.forwarding$": (
        "net.ipv6.conf.all.forwarding = 0\nnet.ipv6.conf.default.forwarding = 0\n"
        "net.ipv6.conf.eth0.forwarding = 1\nnet.ipv6.conf.wlan0.forwarding = 0\n"
    ),
}


def ipv6_runner() -> RecordingRunner:
    runner = make_runner(
        **{
            "sysctl -n net.ipv6.conf.all.forwarding": ok("0\n"),
            "sysctl -n net.ipv6.conf.eth0.accept_ra": ok("1\n"),
        }
    )
    for pattern, out in SYSCTL_A.items():
        runner.responses[("sysctl", "-a", "-r", pattern)] = ok(out)
    return runner


def test_ipv6_ra_adds_the_prefix_address_and_forwarding_and_down_restores_it(
    cfg: ApConfig,
) -> None:
    v6 = cfg.model_copy(update={"ipv6_ra": True})
    v6 = ApConfig.model_validate({**v6.model_dump(), "ipv6_address": "fd00:f10e:1::1/64"})
    runner = ipv6_runner()
    state = ap_up(v6, runner, check_root=False)
    assert state.address6_added == "fd00:f10e:1::1/64"
    # Each global switch first, then what writing it back would not restore.
    assert list(state.sysctl_before.items()) == [
        ("net.ipv4.ip_forward", "0"),
        ("net.ipv4.conf.eth0.forwarding", "1"),
        ("net.ipv6.conf.all.forwarding", "0"),
        ("net.ipv6.conf.eth0.forwarding", "1"),
        ("net.ipv6.conf.eth0.accept_ra", "1"),
    ]
    cmds = commands(runner)
    assert "sysctl -q -w net.ipv6.conf.wlan0.disable_ipv6=1" not in cmds
    order = [
        "ip link set dev wlan0 up",
        "sysctl -q -w net.ipv6.conf.all.forwarding=1",
        "sysctl -q -w net.ipv6.conf.eth0.accept_ra=2",
        "ip -6 addr add fd00:f10e:1::1/64 dev wlan0 nodad",
    ]
    assert [cmds.index(c) for c in order] == sorted(cmds.index(c) for c in order)
    assert "enable-ra" in (v6.work_dir / "dnsmasq.conf").read_text()

    down = RecordingRunner()
    ap_down(v6.state_path, down)
    assert [c for c in commands(down) if c.startswith(("sysctl", "ip -6"))] == [
        "ip -6 addr del fd00:f10e:1::1/64 dev wlan0",
        "sysctl -q -w net.ipv4.ip_forward=0",
        "sysctl -q -w net.ipv4.conf.eth0.forwarding=1",
        "sysctl -q -w net.ipv6.conf.all.forwarding=0",
        "sysctl -q -w net.ipv6.conf.eth0.forwarding=1",
        "sysctl -q -w net.ipv6.conf.eth0.accept_ra=1",
    ]


def test_ipv6_ra_uses_an_address_already_on_the_interface(cfg: ApConfig) -> None:
    v6 = cfg.model_copy(update={"ipv6_ra": True})
    runner = ipv6_runner()
    runner.responses[("ip", "-j", "-6", "addr", "show")] = ok(
        '[{"ifname":"wlan0","addr_info":[{"family":"inet6","local":"fd77:7466::1",'
        '"prefixlen":64,"scope":"global"}]}]'
    )
    state = ap_up(v6, runner, check_root=False)
    assert state.address6_added is None
    assert not any(c.startswith("ip -6 addr add") for c in commands(runner))


def test_ipv6_ra_without_any_address_fails_and_undoes(cfg: ApConfig) -> None:
    v6 = cfg.model_copy(update={"ipv6_ra": True})
    runner = ipv6_runner()
    with pytest.raises(ApError, match="wlan0 has no global IPv6 address") as info:
        ap_up(v6, runner, check_root=False)
    assert "ipv6_address" in (info.value.hint or "")
    assert "sysctl -q -w net.ipv6.conf.all.forwarding=0" in commands(runner)
    assert not cfg.state_path.exists()


def test_a_supervisor_that_cannot_start_undoes_the_bring_up(cfg: ApConfig, monkeypatch) -> None:
    def broken(*_a, **_k):
        raise ApError("the supervisor exited with status 1 at start: ModuleNotFoundError")

    monkeypatch.setattr(lifecycle, "start_supervisor_process", broken)
    runner = make_runner()
    with pytest.raises(ApError, match="supervisor exited with status 1"):
        ap_up(cfg, runner, check_root=False, supervise="process")
    assert "nft delete table inet flowtruth" in commands(runner)
    assert not cfg.state_path.exists()


def test_status_shows_supervisor_restarts_and_give_up(cfg: ApConfig, tmp_path: Path) -> None:
    import typer
    from typer.testing import CliRunner

    from ap_setup.state import DaemonHealth, RestartRecord, SupervisorRecord
    from controller.commands.ap import register

    ap_up(cfg, make_runner(), check_root=False)
    state = ApState.load(cfg.state_path)
    state.supervisor = SupervisorRecord(kind="process", pid=5_000_999, log="/x/supervisor.log")
    state.health["dnsmasq"] = DaemonHealth(
        restarts=3,
        history=[RestartRecord(at="2026-11-29T01:00:00+00:00", reason="killed by SIGKILL",
                               old_pid=5_000_002, new_pid=None)],
        gave_up="dnsmasq keeps exiting: gave up after 3 restart(s) within 300 s",
    )  # fmt: skip
    state.save(cfg.state_path)
    st = ap_status(cfg)
    assert st.supervisor is not None and not st.supervisor_alive
    assert st.health["dnsmasq"].restarts == 3

    conf = tmp_path / "ap.yaml"
    conf.write_text(json.dumps(json.loads(cfg.model_dump_json())))
    app = typer.Typer()
    register(app)
    res = CliRunner().invoke(app, ["ap", "status", "--config", str(conf)], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "supervisor: not running (process, pid 5000999 is gone" in res.output
    row = next(ln for ln in res.output.splitlines() if ln.startswith("│ dnsmasq"))
    cells = [c.strip() for c in row.split("│")[1:-1]]
    assert cells[2:4] == ["no", "3"] and cells[4].endswith("failed; killed by SIGKILL")
    assert "  dnsmasq keeps exiting: gave up after 3 restart(s)" in res.output


def test_hostapd_conf_is_private_from_its_first_byte_and_isolates_phones(
    cfg: ApConfig, monkeypatch
) -> None:
    """hostapd.conf holds the passphrase: never readable by others, not even for a moment
    (an older 0644 file is replaced, not rewritten); ap_isolate is on by default."""
    cfg.work_dir.mkdir(parents=True)
    old = cfg.work_dir / "hostapd.conf"
    old.write_text("wpa_passphrase=old-secret\n")
    old.chmod(0o644)
    modes = []
    real_replace = lifecycle.os.replace

    def checking_replace(src, dst):
        if Path(dst).name == "hostapd.conf":
            modes.append(stat.S_IMODE(os.stat(src).st_mode))
        return real_replace(src, dst)

    monkeypatch.setattr(lifecycle.os, "replace", checking_replace)
    previous = os.umask(0)  # the mode must not depend on the caller's umask
    try:
        state = ap_up(cfg, make_runner(), check_root=False)
    finally:
        os.umask(previous)
    assert modes == [0o600]
    conf = cfg.work_dir / "hostapd.conf"
    assert stat.S_IMODE(conf.stat().st_mode) == 0o600
    text = conf.read_text()
    assert f"wpa_passphrase={state.passphrase}\n" in text and "ap_isolate=1\n" in text
    assert [p.name for p in cfg.work_dir.iterdir() if p.name.endswith(".tmp")] == []
    ap_down(cfg.state_path, RecordingRunner())
    shared = cfg.model_copy(update={"ap_isolate": False})
    ap_up(shared, make_runner(), check_root=False)
    assert "ap_isolate" not in (cfg.work_dir / "hostapd.conf").read_text()


def test_daemons_are_recorded_before_they_are_spawned(cfg: ApConfig) -> None:
    """Each daemon's command line (naming our config file) is in the state file before
    the spawn, so a kill -9 in between cannot hide it from `ap down`."""
    seen: list[dict] = []

    class Watching(RecordingRunner):
        def spawn(self, argv, *, log):
            seen.append(json.loads(cfg.state_path.read_text())["launched"])
            return super().spawn(argv, log=log)

    runner = Watching(responses=make_runner().responses,
                      spawn_logs={"hostapd": "wlan0: AP-ENABLED\n"})  # fmt: skip
    ap_up(cfg, runner, check_root=False)
    assert [sorted(s) for s in seen] == [["hostapd"], ["dnsmasq", "hostapd"]]
    assert seen[1]["dnsmasq"]["argv"] == list(runner.spawned[1])
    assert seen[1]["dnsmasq"]["pid_file"] == str(cfg.work_dir / "dnsmasq.pid")
    assert f"pid-file={cfg.work_dir / 'dnsmasq.pid'}\n" in (
        cfg.work_dir / "dnsmasq.conf").read_text()
    assert seen[0]["hostapd"]["argv"] == list(runner.spawned[0])
    ap_down(cfg.state_path, RecordingRunner())
