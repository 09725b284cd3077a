"""Golden files of the rendered AP configs, and the real parsers accepting them.

Regenerate the golden files after an intended change with
``FLOWTRUTH_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_ap_render.py``.
"""

from __future__ import annotations

import os
import secrets
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from ap_setup.config import ApConfig
from ap_setup.render import (
    nm_dropin_path,
    render_dnsmasq,
    render_hostapd,
    render_iptables,
    render_nft,
    render_nm_unmanaged,
)
from controller.errors import ApError

GOLDEN = Path(__file__).parent / "golden" / "ap"


def make_config(**over: object) -> ApConfig:
    """A full AP config with fixed values (no generated passphrase)."""
    data: dict[str, object] = {
        "interface": "wlx00c0ca123456",
        "uplink": "enp3s0",
        "ssid": "flowtruth-lab",
        "passphrase": "correct-horse-battery",
        "band": "2.4",
        "channel": 6,
        "country_code": "DE",
        "address": "192.168.50.1/24",
        "static_leases": [
            {"mac": "AA:BB:CC:00:00:01", "ip": "192.168.50.11", "name": "pixel-7"},
            {"mac": "aa-bb-cc-00-00-02", "ip": "192.168.50.12", "name": "galaxy-s21"},
        ],
        "dns_hosts": [{"name": "probe.flowtruth.lab", "ip": "192.168.50.1"}],
        "upstream_dns": ["1.1.1.1", "9.9.9.9"],
        "state_dir": "/var/lib/flowtruth",
    }
    data.update(over)
    return ApConfig.model_validate(data)


def five_ghz(**over: object) -> ApConfig:
    """The 5 GHz variant (802.11ac), NAT out of any interface but the AP's."""
    return make_config(
        **{"band": "5", "channel": 36, "ssid": "flowtruth-5g", "uplink": None, **over}
    )


def iptables_text(cfg: ApConfig) -> str:
    plan = render_iptables(cfg)
    lines = (
        ["# up"]
        + [shlex.join(a) for a in plan.up]
        + ["# down"]
        + [shlex.join(a) for a in plan.down]
    )
    return "\n".join(lines) + "\n"


CASES = {
    "hostapd-2g.conf": lambda: render_hostapd(make_config()),
    "hostapd-5g.conf": lambda: render_hostapd(five_ghz()),
    "dnsmasq.conf": lambda: render_dnsmasq(make_config()),
    "dnsmasq-ipv6.conf": lambda: render_dnsmasq(
        make_config(ipv6_ra=True, ipv6_address="fd00:f10e:1::1/64")
    ),
    "nft-inet.nft": lambda: render_nft(make_config()),
    "nft-ip-nat-any-uplink.nft": lambda: render_nft(five_ghz(), "ip"),
    "iptables.txt": lambda: iptables_text(make_config()),
    "nm-unmanaged.conf": lambda: render_nm_unmanaged(make_config()),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_rendered_config_matches_golden(name: str) -> None:
    text = CASES[name]()
    path = GOLDEN / name
    if os.environ.get("FLOWTRUTH_UPDATE_GOLDEN"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"golden file {path} missing; set FLOWTRUTH_UPDATE_GOLDEN=1"
    assert text == path.read_text()


def test_renderers_are_pure() -> None:
    assert render_dnsmasq(make_config()) == render_dnsmasq(make_config())
    assert render_nft(make_config()) == render_nft(make_config())


def test_hostapd_needs_a_passphrase_and_generated_ones_are_valid() -> None:
    cfg = make_config(passphrase=None)
    with pytest.raises(ApError, match="passphrase"):
        render_hostapd(cfg)
    filled = cfg.with_passphrase()
    assert filled.passphrase and 8 <= len(filled.passphrase) <= 63
    assert f"wpa_passphrase={filled.passphrase}\n" in render_hostapd(filled)
    assert cfg.with_passphrase().passphrase != filled.passphrase


def test_dnsmasq_has_one_static_lease_per_phone_and_stays_on_the_ap_interface() -> None:
    text = render_dnsmasq(make_config())
    assert text.count("dhcp-host=") == 2
    assert "dhcp-host=aa:bb:cc:00:00:02,192.168.50.12,galaxy-s21\n" in text
    assert "bind-interfaces\n" in text and "except-interface=lo\n" in text
    assert "enable-ra" not in text
    assert "enable-ra\n" in render_dnsmasq(make_config(ipv6_ra=True))


def test_nm_dropin_path_is_per_interface() -> None:
    cfg = make_config(nm_conf_dir="/tmp/nm")
    assert nm_dropin_path(cfg) == Path("/tmp/nm/99-flowtruth-wlx00c0ca123456.conf")


def test_iptables_down_undoes_every_up_step() -> None:
    plan = render_iptables(make_config())
    created = {tuple(a[a.index("-N") + 1 :]) for a in plan.up if "-N" in a}
    deleted = {tuple(a[a.index("-X") + 1 :]) for a in plan.down if "-X" in a}
    assert created == deleted == {("FT-POSTROUTING",), ("FT-FORWARD",), ("FT-INPUT",)}
    jumps = [a for a in plan.up if "-I" in a]
    unjumps = [a for a in plan.down if "-D" in a]
    assert len(jumps) == len(unjumps) == 3
    open_host = render_iptables(make_config(protect_host=False))
    assert not any("FT-INPUT" in a for a in open_host.up + open_host.down)


def test_iptables_with_ipv6_ra_filters_forwarded_ipv6_too() -> None:
    """Routed IPv6 (no NAT): ip6tables gets the same forward filter, undone first."""
    v4 = render_iptables(make_config())
    assert not any(a[0] == "ip6tables" for a in v4.up + v4.down)
    plan = render_iptables(make_config(ipv6_ra=True, ipv6_address="fd00:f10e:1::1/64"))
    v6_up = [a for a in plan.up if a[0] == "ip6tables"]
    v6_down = [a for a in plan.down if a[0] == "ip6tables"]
    assert not any("nat" in a for a in v6_up)
    forward = [a[2:] for a in v6_up if "FORWARD" in a or "FT-FORWARD" in a]
    assert forward == [a[2:] for a in v4.up if "FORWARD" in a or "FT-FORWARD" in a]
    # the host's input filter in IPv6 terms: ICMPv6 (ND, RA), DHCPv6, DNS, then drop
    v6_input = [" ".join(a[2:]) for a in v6_up if "FT-INPUT" in a]
    assert "-t filter -A FT-INPUT -i wlx00c0ca123456 -p ipv6-icmp -j RETURN" in v6_input
    assert "-t filter -A FT-INPUT -i wlx00c0ca123456 -p udp --dport 547 -j RETURN" in v6_input
    assert "-t filter -A FT-INPUT -d fd00:f10e:1::1 -p udp --dport 53 -j DROP" in v6_input
    assert plan.down[: len(v6_down)] == v6_down  # IPv6 undone before IPv4


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip6tables") is None,
                    reason="needs root and ip6tables")
def test_ip6tables_rules_load_and_down_restores_exactly() -> None:
    ns = f"ftrender-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", ns], check=True)

    def ns_run(argv: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True)

    def dump() -> str:  # rules and chains (empty tables iptables-nft made are ap down's job)
        return "\n".join(ln for ln in (ns_run(["iptables-save"]).stdout
                                       + ns_run(["ip6tables-save"]).stdout).splitlines()
                         if ln.startswith(("-", ":FT")))

    try:
        ns_run(["ip6tables", "-w", "-A", "FORWARD", "-j", "ACCEPT"])  # a rule of someone else's
        before = dump()
        assert "-A FORWARD -j ACCEPT" in before
        plan = render_iptables(make_config(ipv6_ra=True, ipv6_address="fd00:f10e:1::1/64"))
        for argv in plan.up:
            res = ns_run(argv)
            assert res.returncode == 0, (argv, res.stderr)
        assert "FT-FORWARD" in ns_run(["ip6tables-save"]).stdout
        for argv in plan.down:
            res = ns_run(argv)
            assert res.returncode == 0, (argv, res.stderr)
        assert dump() == before
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("nft") is None, reason="needs root and nft")
@pytest.mark.parametrize("nat_family", ["inet", "ip"])
def test_nft_accepts_the_script_twice_in_a_fresh_namespace(nat_family: str) -> None:
    """The script loads (and reloads: it replaces its own tables) in an empty namespace."""
    ns = f"ftrender-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        script = render_nft(make_config(), nat_family)  # type: ignore[arg-type]
        for _ in range(2):
            res = subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=script,
                                 capture_output=True, text=True)  # fmt: skip
            assert res.returncode == 0, res.stderr
        listing = subprocess.run(["ip", "netns", "exec", ns, "nft", "list", "tables"],
                                 capture_output=True, text=True).stdout  # fmt: skip
        expected = {"table inet flowtruth"} | (
            {"table ip flowtruth"} if nat_family == "ip" else set()
        )
        assert set(listing.split("\n")) - {""} == expected
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
