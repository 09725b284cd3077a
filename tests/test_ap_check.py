"""``flowtruth ap check``: parsing of iw/ss/ip output, and the real command on this machine."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ap_setup.check import (
    check_binaries,
    check_forward_policy,
    check_ipv6,
    check_networkmanager,
    check_ports,
    check_radio,
    check_uplink,
    checks_passed,
    run_checks,
)
from ap_setup.config import ApConfig
from ap_setup.runner import RecordingRunner, ShellResult

REPO = Path(__file__).resolve().parents[1]

IW_PHY = """\
Wiphy phy0
\twiphy index: 0
\tBand 1:
\t\tFrequencies:
\t\t\t* 2412 MHz [1] (20.0 dBm)
\t\t\t* 2437 MHz [6] (20.0 dBm)
\t\t\t* 2467 MHz [12] (disabled)
\tBand 2:
\t\tVHT Capabilities (0x338001b2):
\t\tFrequencies:
\t\t\t* 5180 MHz [36] (23.0 dBm)
\t\t\t* 5260 MHz [52] (20.0 dBm) (no IR, radar detection)
\tSupported interface modes:
\t\t * IBSS
\t\t * managed
\t\t * AP
\t\t * monitor
\tsoftware interface modes (can always be added):
"""
IW_NO_AP = IW_PHY.replace("\t\t * AP\n", "")


def ok(stdout: str = "") -> ShellResult:
    return ShellResult((), 0, stdout, "")


def radio_runner(phy: str = IW_PHY, reg: str = "global\ncountry DE: DFS-ETSI\n") -> RecordingRunner:
    return RecordingRunner(
        responses={
            ("iw", "list"): ok(phy),
            ("iw", "dev", "wlan0", "info"): ok("Interface wlan0\n\tifindex 3\n\twiphy 0\n"),
            ("iw", "phy", "phy0", "info"): ok(phy),
            ("iw", "reg", "get"): ok(reg),
        }
    )


def by_name(results):
    return {r.name: r for r in results}


def test_radio_that_can_be_an_ap() -> None:
    res = by_name(check_radio(ApConfig(country_code="DE"), radio_runner()))
    assert res["ap mode"].ok and res["regulatory domain"].ok and res["channel"].ok
    assert "2437 MHz" in res["channel"].message


def test_radio_without_ap_mode_and_unset_regdomain() -> None:
    res = by_name(
        check_radio(
            ApConfig(country_code="DE"), radio_runner(IW_NO_AP, "global\ncountry 00: DFS-UNSET\n")
        )
    )
    assert not res["ap mode"].ok and "AP mode" in res["ap mode"].fix
    assert not res["regulatory domain"].ok and res["regulatory domain"].fix.startswith(
        "iw reg set DE"
    )


@pytest.mark.parametrize(("channel", "why"), [(52, "no IR"), (44, "not offered")])
def test_5ghz_channel_not_allowed(channel: int, why: str) -> None:
    cfg = ApConfig(band="5", channel=channel, country_code="DE")
    res = by_name(check_radio(cfg, radio_runner()))
    assert not res["channel"].ok and res["channel"].blocking
    assert why in res["channel"].message


def test_no_wifi_at_all() -> None:
    runner = RecordingRunner(
        responses={("iw", "list"): ShellResult((), 1, "", "nl80211 not found.")}
    )
    (only,) = check_radio(ApConfig(), runner)
    assert not only.ok and "no Wi-Fi device" in only.message
    assert check_radio(ApConfig(radio=False), runner) == []


SS = """\
udp   UNCONN 0      0         127.0.0.53%lo:53        0.0.0.0:*    users:(("systemd-resolve",pid=612,fd=13))
tcp   LISTEN 0      4096      127.0.0.53%lo:53        0.0.0.0:*    users:(("systemd-resolve",pid=612,fd=14))
tcp   LISTEN 0      128             0.0.0.0:22        0.0.0.0:*    users:(("sshd",pid=900,fd=3))
"""


def test_systemd_resolved_on_its_stub_address_does_not_conflict() -> None:
    (only,) = check_ports(ApConfig(), RecordingRunner(responses={("ss",): ok(SS)}))
    assert only.ok and "systemd-resolved" in only.message


def test_a_wildcard_dns_server_conflicts() -> None:
    ss = (
        SS
        + 'udp   UNCONN 0      0         0.0.0.0:53        0.0.0.0:*    users:(("dnsmasq",pid=77,fd=4))\n'
    )
    ss += 'udp   UNCONN 0      0         0.0.0.0:67        0.0.0.0:*    users:(("dnsmasq",pid=77,fd=5))\n'
    ss += 'udp   UNCONN 0      0         *:53        *:*    users:(("systemd-resolve",pid=612,fd=20))\n'
    res = check_ports(ApConfig(), RecordingRunner(responses={("ss",): ok(ss)}))
    assert [r.name for r in res] == ["port 53", "port 67", "port 53"]
    assert "systemctl disable --now dnsmasq" in res[0].fix
    assert "DNSStubListener" in res[2].fix
    assert not checks_passed(res)


def test_uplink_route_checks() -> None:
    route = ok('[{"dst":"1.1.1.1","gateway":"10.0.0.1","dev":"eth0","prefsrc":"10.0.0.5"}]')
    runner = RecordingRunner(responses={("ip", "-j", "route", "get"): route})
    assert check_uplink(ApConfig(uplink="eth0"), runner).ok
    wrong = check_uplink(ApConfig(uplink="enp3s0"), runner)
    assert not wrong.ok and "uplink: eth0" in wrong.fix
    none = RecordingRunner(
        responses={
            ("ip", "-j", "route", "get"): ShellResult(
                (), 2, "", "RTNETLINK answers: Network is unreachable"
            )
        }
    )
    assert "no route" in check_uplink(ApConfig(), none).message


def test_networkmanager_and_wpa_supplicant() -> None:
    runner = RecordingRunner(
        responses={
            ("nmcli", "-t", "-f", "RUNNING", "general"): ok("running\n"),
            ("nmcli", "-t", "-f", "DEVICE,STATE", "device", "status"): ok("wlan0:connected\n"),
            ("pgrep",): ok("812 /sbin/wpa_supplicant -u -s -O /run/wpa_supplicant -iwlan0\n"),
        }
    )
    res = by_name(check_networkmanager(ApConfig(), runner))
    assert not res["networkmanager"].ok and not res["networkmanager"].blocking
    assert not res["wpa_supplicant"].ok and res["wpa_supplicant"].blocking


def test_a_forward_drop_policy_elsewhere_is_a_warning() -> None:
    ruleset = (
        "table ip filter {\n\tchain FORWARD {\n"
        "\t\ttype filter hook forward priority filter; policy drop;\n\t}\n}\n"
        "table inet flowtruth {\n\tchain forward {\n"
        "\t\ttype filter hook forward priority filter; policy drop;\n\t}\n}\n"
    )
    runner = RecordingRunner(responses={("nft", "list", "ruleset"): ok(ruleset)})
    (only,) = check_forward_policy(ApConfig(uplink="eth0"), runner)
    assert not only.ok and not only.blocking
    assert "table ip filter" in only.message and "DOCKER-USER" in only.fix
    assert check_forward_policy(ApConfig(), RecordingRunner()) == []


def test_missing_binaries_each_get_a_line() -> None:
    runner = RecordingRunner(missing={"hostapd", "dnsmasq", "rfkill"})
    res = check_binaries(ApConfig(), runner)
    assert {r.name for r in res} == {"program hostapd", "program dnsmasq", "program rfkill"}
    assert by_name(res)["program dnsmasq"].fix == "apt-get install dnsmasq-base"
    assert not by_name(res)["program rfkill"].blocking


def test_every_result_has_a_fix_when_failing() -> None:
    for r in run_checks(ApConfig(interface="ftnowifi0")):
        assert r.ok or r.fix, r


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    exe = REPO / ".venv" / "bin" / "flowtruth"
    argv = [str(exe)] if exe.exists() else [sys.executable, "-m", "controller.cli"]
    env = dict(os.environ, COLUMNS="200", PYTHONPATH=str(REPO))
    return subprocess.run(
        [*argv, *args], capture_output=True, text=True, timeout=60, cwd=REPO, env=env
    )


def test_flowtruth_ap_check_on_a_machine_without_wifi(tmp_path: Path) -> None:
    """The real command on this (Wi-Fi-less) machine: a readable report, exit 1, no traceback."""
    res = _cli("ap", "check", "--interface", "ftnowifi0")
    out = res.stdout + res.stderr
    assert res.returncode == 1, out
    assert "Traceback" not in out
    assert "FAIL interface: interface ftnowifi0 not found" in out
    assert "fix: " in out
    assert "problem(s) must be fixed" in out


def test_cli_config_errors_are_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "ap.yaml"
    bad.write_text("channel: 99\n")
    res = _cli("ap", "check", "--config", str(bad))
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert f"{bad}: (top level): channel 99 is not a 2.4 GHz channel" in res.stderr


def test_standalone_scripts_use_the_same_code(tmp_path: Path) -> None:
    res = subprocess.run([str(REPO / "ap_setup" / "ap-down"), "--interface", "ftnowifi0",
                          "--config", str(tmp_path / "none.yaml")], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert (
        res.returncode == 2
        and "no such config file" in res.stderr
        and "Traceback" not in res.stderr
    )
    cfg = tmp_path / "ap.yaml"
    cfg.write_text(f"state_dir: {tmp_path / 'state'}\n")
    res = subprocess.run([str(REPO / "ap_setup" / "ap-down"), "--config", str(cfg)],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert res.returncode == 0 and "nothing was up" in res.stdout
    res = subprocess.run(
        [str(REPO / "ap_setup" / "ap-up"), "--help"], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0 and "--capture" in res.stdout


def test_ipv6_checks_only_with_router_advertisements() -> None:
    assert check_ipv6(ApConfig(), RecordingRunner()) == []
    cfg = ApConfig(ipv6_ra=True)
    bare = RecordingRunner(responses={("dnsmasq", "--version"): ok("Compile time options: IPv6 "
                                                                     "no-DHCPv6 DHCP")})  # fmt: skip
    res = check_ipv6(cfg, bare)
    assert [r.name for r in res] == ["ipv6", "ipv6", "ipv6"]
    assert "without DHCPv6" in res[0].message and res[0].blocking
    assert "ipv6_address" in res[1].fix and res[1].blocking
    assert "no IPv6 default route" in res[2].message and not res[2].blocking
    good = RecordingRunner(responses={
        ("dnsmasq", "--version"): ok("Compile time options: IPv6 DHCP DHCPv6"),
        ("ip", "-6", "route", "show", "default"): ok("default via fe80::1 dev eth0\n"),
    })  # fmt: skip
    with_addr = ApConfig.model_validate({"ipv6_ra": True, "ipv6_address": "fd00:1::1/64"})
    assert [r.ok for r in check_ipv6(with_addr, good)] == [True]
