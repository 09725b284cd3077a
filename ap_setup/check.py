"""``flowtruth ap check``: every missing or wrong thing on its own line, with the fix.

Checks only read the system (no traffic leaves the machine, nothing is changed).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from dataclasses import dataclass

from ap_setup.config import ApConfig
from ap_setup.lifecycle import global_ipv6, nm_device_state, nm_running, required_binaries
from ap_setup.runner import Runner, SubprocessRunner


@dataclass(frozen=True)
class CheckResult:
    """One line of the report; ``fix`` says what to do when ``ok`` is False."""

    name: str
    ok: bool
    message: str
    fix: str = ""
    blocking: bool = True


def _ok(name: str, message: str) -> CheckResult:
    return CheckResult(name, True, message)


def _bad(name: str, message: str, fix: str, blocking: bool = True) -> CheckResult:
    return CheckResult(name, False, message, fix, blocking)


def check_root() -> CheckResult:
    """Running as root?"""
    if os.geteuid() == 0:
        return _ok("root", "running as root")
    return _bad("root", "not running as root", "run with sudo")


def check_binaries(cfg: ApConfig, runner: Runner) -> list[CheckResult]:
    """One line per required program that is missing."""
    apt = {"ip": "iproute2", "sysctl": "procps", "hostapd": "hostapd", "dnsmasq": "dnsmasq-base",
           "ethtool": "ethtool", "iw": "iw", "tcpdump": "tcpdump", "dumpcap": "wireshark-common",
           "nft": "nftables", "iptables": "iptables", "rfkill": "rfkill", "ss": "iproute2"}  # fmt: skip
    need = required_binaries(cfg) + [cfg.capture.tool, "ss"]
    if cfg.radio:
        need += ["iw"]
    out = [
        _bad(f"program {b}", f"{b} is not installed", f"apt-get install {apt.get(b, b)}")
        for b in need
        if runner.which(b) is None
    ]
    if runner.which("nft") is None and runner.which("iptables") is None:
        out.append(
            _bad("program nft", "neither nft nor iptables is installed", "apt-get install nftables")
        )
    if cfg.radio and runner.which("rfkill") is None:
        out.append(
            _bad("program rfkill", "rfkill is not installed; a soft-blocked radio stays blocked",
                 "apt-get install rfkill", blocking=False)
        )  # fmt: skip
    if not out:
        out.append(_ok("programs", "all required programs are installed"))
    return out


def check_interface(cfg: ApConfig, runner: Runner) -> CheckResult:
    """Does the AP interface exist?"""
    res = runner.run(["ip", "link", "show", "dev", cfg.interface])
    where = f" in namespace {cfg.netns}" if cfg.netns else ""
    if res.ok:
        return _ok("interface", f"{cfg.interface} exists{where}")
    return _bad(
        "interface",
        f"interface {cfg.interface} not found{where}",
        "plug in the Wi-Fi adapter or set `interface` in the AP config (`ip link` lists them)",
    )


def _phy_of(runner: Runner, interface: str) -> str | None:
    res = runner.run(["iw", "dev", interface, "info"])
    m = re.search(r"^\s*wiphy (\d+)", res.stdout, re.M) if res.ok else None
    return f"phy{m.group(1)}" if m else None


def check_radio(cfg: ApConfig, runner: Runner) -> list[CheckResult]:
    """AP mode, regulatory domain and channel permission (only with a radio)."""
    if not cfg.radio:
        return []
    listing = runner.run(["iw", "list"])
    if not listing.ok or "Wiphy" not in listing.stdout:
        return [
            _bad(
                "wifi",
                "no Wi-Fi device found (`iw list` lists none)",
                "plug in a Wi-Fi adapter that supports AP mode (e.g. mt7612u, rtl8812au)",
            )
        ]
    out: list[CheckResult] = []
    phy = _phy_of(runner, cfg.interface)
    info = runner.run(["iw", "phy", phy, "info"]).stdout if phy else listing.stdout
    modes = re.search(r"Supported interface modes:\n((?:\s+\* .*\n)+)", info)
    if modes and re.search(r"\*\s+AP\s*$", modes.group(1), re.M):
        out.append(_ok("ap mode", f"{phy or 'the radio'} supports AP mode"))
    else:
        out.append(
            _bad("ap mode", f"{phy or cfg.interface} does not list AP among its interface modes",
                 "use an adapter whose driver supports AP mode (`iw list`)")
        )  # fmt: skip

    reg = runner.run(["iw", "reg", "get"])
    m = re.search(r"country (\w\w):", reg.stdout) if reg.ok else None
    country = m.group(1) if m else None
    if country in (None, "00"):
        out.append(
            _bad("regulatory domain", "regulatory domain is unset (world domain 00)",
                 f"iw reg set {cfg.country_code or 'XX'}  (and set country_code in the AP config)",
                 blocking=cfg.band == "5")
        )  # fmt: skip
    elif cfg.country_code and country != cfg.country_code:
        out.append(
            _bad("regulatory domain", f"kernel regulatory domain is {country}, config says {cfg.country_code}",
                 f"iw reg set {cfg.country_code}", blocking=False)
        )  # fmt: skip
    else:
        out.append(_ok("regulatory domain", f"regulatory domain {country}"))

    chan = re.search(rf"^\s*\* (\d+)(?:\.\d+)? MHz \[{cfg.channel}\](.*)$", info, re.M)
    if chan is None:
        out.append(_bad("channel", f"channel {cfg.channel} is not offered by {phy or 'the radio'}",
                        "pick a channel listed by `iw list`"))  # fmt: skip
    elif "disabled" in chan.group(2) or "no IR" in chan.group(2) or "radar" in chan.group(2):
        out.append(
            _bad("channel", f"channel {cfg.channel} ({chan.group(1)} MHz) is not allowed for an AP here:{chan.group(2)}",
                 "pick a channel without 'disabled', 'no IR' or 'radar' in `iw list` (5 GHz: 36-48 usually)")
        )  # fmt: skip
    else:
        out.append(_ok("channel", f"channel {cfg.channel} ({chan.group(1)} MHz) allowed"))
    if cfg.band == "5" and cfg.ieee80211ac and "VHT Capabilities" not in info:
        out.append(_bad("802.11ac", "the radio has no VHT (802.11ac) support",
                        "set ieee80211ac: false in the AP config", blocking=False))  # fmt: skip
    return out


def check_ports(cfg: ApConfig, runner: Runner) -> list[CheckResult]:
    """Is port 53 (DNS) or 67 (DHCP) on the AP address or the wildcard held by someone else?"""
    res = runner.run(["ss", "-H", "-l", "-n", "-u", "-t", "-p"])
    if not res.ok:
        return [
            _bad("ports", f"cannot list sockets: {res.describe()}", "install iproute2 (ss)", False)
        ]
    out: list[CheckResult] = []
    ours = str(cfg.address.ip)
    resolved_seen = False
    for line in res.stdout.splitlines():
        cols = line.split()
        if len(cols) < 5:
            continue
        local = cols[4] if cols[0] in ("udp", "tcp") else cols[3]
        addr, _, port = local.rpartition(":")
        addr = addr.strip("[]").split("%")[0]
        if port not in ("53", "67"):
            continue
        proc = re.search(r'users:\(\("([^"]+)"', line)
        who = proc.group(1) if proc else "another program"
        if who == "systemd-resolve" and addr.startswith("127.0.0.5"):
            resolved_seen = True
            continue
        if addr in ("0.0.0.0", "*", "::", ours):
            if who == "systemd-resolve":
                fix = "set DNSStubListener=no (or drop DNSStubListenerExtra) in /etc/systemd/resolved.conf, then systemctl restart systemd-resolved"
            elif who == "dnsmasq":
                fix = "systemctl disable --now dnsmasq (the packaged service listens everywhere)"
            else:
                fix = f"stop {who} or make it listen on another address"
            if not any(r.name == f"port {port}" and who in r.message for r in out):
                out.append(
                    _bad(
                        f"port {port}",
                        f"{who} holds {addr or '*'}:{port}, which dnsmasq needs",
                        fix,
                    )
                )
    if not out:
        note = (
            " (systemd-resolved on 127.0.0.53 does not conflict: dnsmasq binds only the AP address)"
            if resolved_seen
            else ""
        )
        out.append(_ok("ports", f"ports 53 and 67 are free on {ours}{note}"))
    return out


def check_uplink(cfg: ApConfig, runner: Runner) -> CheckResult:
    """Is there a route to the internet, out of the configured uplink? (No traffic is sent.)"""
    target = next(
        (str(ip) for ip in cfg.upstream_dns if isinstance(ip, ipaddress.IPv4Address)), "1.1.1.1"
    )
    res = runner.run(["ip", "-j", "route", "get", target])
    if not res.ok:
        return _bad("uplink", f"no route to the internet ({target} unreachable)",
                    "connect the workstation's wired uplink (a default route is needed for NAT)")  # fmt: skip
    try:
        dev = json.loads(res.stdout)[0].get("dev")
    except (ValueError, IndexError, AttributeError):
        dev = None
    if dev == cfg.interface:
        return _bad("uplink", f"the route to {target} goes out of the AP interface {cfg.interface}",
                    "give the uplink its own interface and set `uplink`")  # fmt: skip
    if cfg.uplink and dev != cfg.uplink:
        return _bad("uplink", f"the route to {target} leaves via {dev}, not the configured uplink {cfg.uplink}",
                    f"set uplink: {dev} in the AP config, or fix the default route")  # fmt: skip
    state = runner.run(["ip", "-j", "link", "show", "dev", dev or ""]) if dev else None
    if state is not None and state.ok and '"operstate":"DOWN"' in state.stdout.replace(" ", ""):
        return _bad("uplink", f"uplink {dev} is down", f"ip link set {dev} up / plug the cable in")
    return _ok("uplink", f"internet route via {dev}")


def check_networkmanager(cfg: ApConfig, runner: Runner) -> list[CheckResult]:
    """Will NetworkManager or wpa_supplicant fight hostapd for the interface?"""
    out: list[CheckResult] = []
    if nm_running(cfg, runner):
        state = nm_device_state(runner, cfg.interface)
        if state not in (None, "unmanaged"):
            out.append(
                _bad("networkmanager", f"NetworkManager manages {cfg.interface} (state {state})",
                     "`flowtruth ap up` hands it off itself; or: nmcli device set "
                     f"{cfg.interface} managed no", blocking=False)
            )  # fmt: skip
        else:
            out.append(_ok("networkmanager", f"NetworkManager leaves {cfg.interface} alone"))
    if cfg.radio:
        res = runner.run(["pgrep", "-a", "wpa_supplicant"])
        if res.ok and re.search(rf"-i\s*{re.escape(cfg.interface)}\b", res.stdout):
            out.append(_bad("wpa_supplicant", f"wpa_supplicant runs on {cfg.interface} and will fight hostapd",
                            f"disconnect {cfg.interface} from Wi-Fi networks (nmcli device disconnect {cfg.interface})"))  # fmt: skip
    return out


def check_forward_policy(cfg: ApConfig, runner: Runner) -> list[CheckResult]:
    """Does another firewall table drop forwarded packets (Docker, ufw, firewalld)?"""
    if runner.which("nft") is None:
        return []
    res = runner.run(["nft", "list", "ruleset"])
    if not res.ok:
        return []
    table = ""
    out: list[CheckResult] = []
    for line in res.stdout.splitlines():
        words = line.split()
        if words[:1] == ["table"] and len(words) >= 3:
            table = f"{words[1]} {words[2]}"
        elif "hook forward" in line and "policy drop" in line and not table.endswith(" flowtruth"):
            out.append(
                _bad(
                    "forwarding",
                    f"table {table} drops forwarded packets by default; phones may get no internet",
                    f"allow {cfg.interface} <-> {cfg.uplink or 'the uplink'} there "
                    f"(Docker: iptables -I DOCKER-USER -i {cfg.interface} -j ACCEPT and "
                    f"-o {cfg.interface} -j ACCEPT; ufw: ufw route allow in on {cfg.interface})",
                    blocking=False,
                )
            )
    return out


def check_ipv6(cfg: ApConfig, runner: Runner) -> list[CheckResult]:
    """With ``ipv6_ra``: dnsmasq can send router advertisements, a prefix, a way out."""
    if not cfg.ipv6_ra:
        return []
    out = []
    version = runner.run(["dnsmasq", "--version"])
    if version.ok and ("no-DHCPv6" in version.stdout or "DHCPv6" not in version.stdout):
        out.append(_bad("ipv6", "this dnsmasq is built without DHCPv6, so it sends no router "
                        "advertisements", "install a dnsmasq built with DHCPv6 (Debian's "
                        "dnsmasq-base is) or set ipv6_ra: false"))  # fmt: skip
    if cfg.ipv6_address is None and not global_ipv6(runner, cfg.interface):
        out.append(_bad("ipv6", f"ipv6_ra is on but {cfg.interface} has no global IPv6 address "
                        "and no ipv6_address is set", "set ipv6_address in the AP config, "
                        "e.g. fd00:f10e:1::1/64"))  # fmt: skip
    route = runner.run(["ip", "-6", "route", "show", "default"])
    if route.ok and not route.stdout.strip():
        out.append(_bad("ipv6", "no IPv6 default route: phones get IPv6 addresses but cannot "
                        "leave the lab over IPv6", "give the uplink IPv6 (or set ipv6_ra: "
                        "false)", blocking=False))  # fmt: skip
    if not out:
        out.append(_ok("ipv6", "router advertisements can be sent"))
    return out


def run_checks(cfg: ApConfig, runner: Runner | None = None) -> list[CheckResult]:
    """All preflight checks for this config, in report order."""
    runner = runner or SubprocessRunner(cfg.netns)
    results = [check_root()]
    results += check_binaries(cfg, runner)
    iface = check_interface(cfg, runner)
    results.append(iface)
    results += check_radio(cfg, runner)
    results += check_ports(cfg, runner)
    results.append(check_uplink(cfg, runner))
    results += check_forward_policy(cfg, runner)
    results += check_networkmanager(cfg, runner)
    results += check_ipv6(cfg, runner)
    return results


def checks_passed(results: list[CheckResult]) -> bool:
    """True when no blocking check failed."""
    return all(r.ok or not r.blocking for r in results)
