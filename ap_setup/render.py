"""Pure renderers: one :class:`ApConfig` in, config text or argv lists out.

Nothing here touches the system; golden-file tests pin the output.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ap_setup.config import ApConfig
from controller.errors import ApError

HEADER = "# Rendered by flowtruth from the AP config; edit the config, not this file."
NFT_TABLE = "flowtruth"
IPT_FORWARD = "FT-FORWARD"
IPT_POSTROUTING = "FT-POSTROUTING"
IPT_INPUT = "FT-INPUT"


def render_hostapd(cfg: ApConfig) -> str:
    """hostapd.conf: WPA2-PSK (CCMP), SSID, band and channel, regulatory domain, 802.11n/ac."""
    if cfg.passphrase is None:
        raise ApError("no WPA2 passphrase in the AP config", hint="use cfg.with_passphrase()")
    five = cfg.band == "5"
    lines = [
        HEADER,
        f"interface={cfg.interface}",
        "driver=nl80211",
        f"ctrl_interface={cfg.work_dir / 'hostapd-ctrl'}",
        "ctrl_interface_group=0",
        f"ssid={cfg.ssid}",
        "utf8_ssid=1",
    ]
    if cfg.country_code:
        lines += [f"country_code={cfg.country_code}", "ieee80211d=1"]
    lines += [
        f"hw_mode={'a' if five else 'g'}",
        f"channel={cfg.channel}",
        "beacon_int=100",
        "wmm_enabled=1",
    ]
    if cfg.ieee80211n:
        lines.append("ieee80211n=1")
    if five and cfg.ieee80211ac:
        lines += ["ieee80211ac=1", "vht_oper_chwidth=0"]
    if cfg.ap_isolate:
        lines.append("ap_isolate=1")
    lines += [
        "auth_algs=1",
        "ignore_broadcast_ssid=0",
        "macaddr_acl=0",
        "wpa=2",
        "wpa_key_mgmt=WPA-PSK",
        "rsn_pairwise=CCMP",
        f"wpa_passphrase={cfg.passphrase}",
    ]
    return "\n".join(lines) + "\n"


def render_dnsmasq(cfg: ApConfig) -> str:
    """dnsmasq.conf: DHCP and DNS on the AP interface only, a static lease per phone."""
    net = cfg.address.network
    start, end = cfg.pool
    work = cfg.work_dir
    lines = [
        HEADER,
        f"interface={cfg.interface}",
        "except-interface=lo",
        "bind-interfaces",
        f"listen-address={cfg.address.ip}",
        "no-resolv",
        "no-hosts",
        "no-poll",
        "domain-needed",
        "bogus-priv",
        "cache-size=1000",
    ]
    lines += [f"server={ip}" for ip in cfg.upstream_dns]
    lines += [f"address=/{h.name}/{h.ip}" for h in cfg.dns_hosts]
    lines += [
        "dhcp-authoritative",
        f"dhcp-range={start},{end},{net.netmask},{cfg.lease_time}",
        f"dhcp-option=option:router,{cfg.address.ip}",
        f"dhcp-option=option:dns-server,{cfg.address.ip}",
    ]
    lines += [f"dhcp-host={lease.mac},{lease.ip},{lease.name}" for lease in cfg.static_leases]
    if cfg.ipv6_ra:
        lines += ["enable-ra", f"dhcp-range=::,constructor:{cfg.interface},ra-stateless"]
    lines += [
        f"dhcp-leasefile={work / 'dnsmasq.leases'}",
        "log-dhcp",
        "log-queries",
        f"log-facility={work / 'dnsmasq.log'}",
        f"pid-file={work / 'dnsmasq.pid'}",
    ]
    return "\n".join(lines) + "\n"


NatFamily = Literal["inet", "ip"]


def nft_tables(nat_family: NatFamily = "inet") -> list[str]:
    """The tables :func:`render_nft` creates, as ``family name`` (what teardown deletes)."""
    tables = [f"inet {NFT_TABLE}"]
    if nat_family == "ip":
        tables.append(f"ip {NFT_TABLE}")
    return tables


def _host_ports(cfg: ApConfig, v6: bool) -> list[tuple[str, int]]:
    """(protocol, port) phones may open on the AP host: DHCP, DNS, DHCPv6, ``host_ports``."""
    ports = [("udp", 547)] if v6 else [("udp", 67)]
    ports += [("udp", 53), ("tcp", 53)]
    for item in cfg.host_ports:
        proto, port = item.split("/")
        if (proto, int(port)) not in ports:
            ports.append((proto, int(port)))
    return ports


def _addresses6(cfg: ApConfig, extra: Sequence[str]) -> list[str]:
    """The AP interface's global IPv6 addresses (without prefix length), for ``ipv6_ra``."""
    if not cfg.ipv6_ra:
        return []
    out = [str(cfg.ipv6_address.ip)] if cfg.ipv6_address is not None else []
    for item in extra:
        ip = item.split("/")[0]
        if ip not in out:
            out.append(ip)
    return out


def render_nft(
    cfg: ApConfig, nat_family: NatFamily = "inet", addresses6: Sequence[str] = ()
) -> str:
    """An ``nft -f`` script for forwarding and masquerading, in dedicated tables only.

    ``nat_family="ip"`` puts NAT into ``ip flowtruth`` for kernels without inet NAT
    (before 5.2). The script first deletes its own tables, so it is idempotent. With
    ``protect_host`` an input chain lets phones open only DHCP, DNS (and DHCPv6), ICMP and
    ``host_ports`` on the host, and closes dnsmasq's ports on the AP's addresses to every
    other interface; ``addresses6`` are the AP interface's IPv6 addresses besides
    ``ipv6_address``.
    """
    ap = f'"{cfg.interface}"'
    out_match = f'oifname "{cfg.uplink}"' if cfg.uplink else f"oifname != {ap}"
    in_match = f'iifname "{cfg.uplink}"' if cfg.uplink else f"iifname != {ap}"
    lines = ["#!/usr/sbin/nft -f", HEADER]
    for table in nft_tables(nat_family):
        lines += [f"table {table} {{}}", f"delete table {table}"]
    forward = [
        "    chain forward {",
        "        type filter hook forward priority filter; policy accept;",
        # ap_isolate: nor may a phone reach another routed through the host
        *([f"        iifname {ap} oifname {ap} drop"] if cfg.ap_isolate else []),
        f"        iifname {ap} {out_match} accept",
        f"        {in_match} oifname {ap} ct state established,related accept",
        f"        {in_match} oifname {ap} drop",
        "    }",
    ]
    nat = [
        "    chain postrouting {",
        "        type nat hook postrouting priority srcnat; policy accept;",
        f"        ip saddr {cfg.address.network} {out_match} masquerade",
        "    }",
    ]
    lines.append(f"table inet {NFT_TABLE} {{")
    lines += forward
    if cfg.protect_host:
        lines += _nft_input(cfg, addresses6)
    if nat_family == "inet":
        lines += nat
    lines.append("}")
    if nat_family == "ip":
        lines += [f"table ip {NFT_TABLE} {{", *nat, "}"]
    return "\n".join(lines) + "\n"


def _nft_input(cfg: ApConfig, addresses6: Sequence[str]) -> list[str]:
    ap = f'"{cfg.interface}"'
    v6 = _addresses6(cfg, addresses6)
    out = [
        "    chain input {",
        "        type filter hook input priority filter; policy accept;",
        f"        iifname {ap} ct state established,related accept",
        f"        iifname {ap} meta l4proto {{ icmp, ipv6-icmp }} accept",
    ]
    ports = _host_ports(cfg, v6=False) + (_host_ports(cfg, v6=True) if cfg.ipv6_ra else [])
    seen = set()
    for proto, port in ports:
        if (proto, port) not in seen:
            seen.add((proto, port))
            out.append(f"        iifname {ap} {proto} dport {port} accept")
    out.append(f"        iifname {ap} drop")
    # dnsmasq binds the AP's addresses, which the uplink side can reach too
    others = f'iifname != {{ {ap}, "lo" }}'
    out.append(f"        {others} ip daddr {cfg.address.ip} meta l4proto {{ tcp, udp }} "
               "th dport { 53, 67 } drop")  # fmt: skip
    if v6:
        out.append(f"        {others} ip6 daddr {{ {', '.join(v6)} }} "
                   "meta l4proto { tcp, udp } th dport { 53, 547 } drop")  # fmt: skip
    out.append("    }")
    return out


@dataclass(frozen=True)
class IptablesPlan:
    """iptables argv lists that set NAT up, and those that undo exactly that."""

    up: list[list[str]]
    down: list[list[str]]


def render_iptables(
    cfg: ApConfig, binary: str = "iptables", addresses6: Sequence[str] = ()
) -> IptablesPlan:
    """The iptables fallback: dedicated chains jumped to from FORWARD, POSTROUTING and
    (with ``protect_host``) INPUT.

    With ``ipv6_ra`` (routed IPv6, no NAT) the same forward filter goes into ip6tables
    too, so the phones stay unreachable from outside over IPv6 as over IPv4 (what the
    nftables ``inet`` table does in one go), and so does the host's input filter.
    """
    plan = _iptables_v4(cfg, binary)
    if not cfg.ipv6_ra:
        return plan
    ipt6 = [binary.replace("iptables", "ip6tables"), "-w"]
    v6 = _iptables_forward(cfg, ipt6)
    if cfg.protect_host:
        inp = _iptables_input(cfg, ipt6, _addresses6(cfg, addresses6))
        v6 = IptablesPlan(up=v6.up + inp.up, down=inp.down + v6.down)
    return IptablesPlan(up=plan.up + v6.up, down=v6.down + plan.down)


def _iptables_input(cfg: ApConfig, ipt: list[str], addresses6: list[str] | None) -> IptablesPlan:
    """The host's input filter (``addresses6`` None: IPv4). Allowed packets RETURN to the
    rest of INPUT, so the host's own rules still apply to them: this chain only removes."""
    v6 = addresses6 is not None
    ap = cfg.interface
    chain = [*ipt, "-t", "filter", "-A", IPT_INPUT]
    up = [
        [*ipt, "-t", "filter", "-N", IPT_INPUT],
        [*chain, "-i", "lo", "-j", "RETURN"],
        [*chain, "-i", ap, "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", "RETURN"],
        [*chain, "-i", ap, "-p", "ipv6-icmp" if v6 else "icmp", "-j", "RETURN"],
    ]  # fmt: skip
    for proto, port in _host_ports(cfg, v6):
        up.append([*chain, "-i", ap, "-p", proto, "--dport", str(port), "-j", "RETURN"])
    up.append([*chain, "-i", ap, "-j", "DROP"])
    # dnsmasq binds the AP's addresses, which the uplink side can reach too
    for addr in addresses6 if addresses6 is not None else [str(cfg.address.ip)]:
        for proto, port in (("udp", 53), ("tcp", 53), ("udp", 547 if v6 else 67)):
            up.append([*chain, "-d", addr, "-p", proto, "--dport", str(port), "-j", "DROP"])
    up.append([*ipt, "-t", "filter", "-I", "INPUT", "1", "-j", IPT_INPUT])
    down = [
        [*ipt, "-t", "filter", "-D", "INPUT", "-j", IPT_INPUT],
        [*ipt, "-t", "filter", "-F", IPT_INPUT],
        [*ipt, "-t", "filter", "-X", IPT_INPUT],
    ]
    return IptablesPlan(up=up, down=down)


def _iptables_forward(cfg: ApConfig, ipt: list[str]) -> IptablesPlan:
    """The forward filter chain only: out from the AP freely, in only as replies."""
    out = ["-o", cfg.uplink] if cfg.uplink else ["!", "-o", cfg.interface]
    inn = ["-i", cfg.uplink] if cfg.uplink else ["!", "-i", cfg.interface]
    isolate = [[*ipt, "-t", "filter", "-A", IPT_FORWARD, "-i", cfg.interface,
                "-o", cfg.interface, "-j", "DROP"]] if cfg.ap_isolate else []  # fmt: skip
    up = [
        [*ipt, "-t", "filter", "-N", IPT_FORWARD],
        *isolate,
        [*ipt, "-t", "filter", "-A", IPT_FORWARD, "-i", cfg.interface, *out, "-j", "ACCEPT"],
        [*ipt, "-t", "filter", "-A", IPT_FORWARD, *inn, "-o", cfg.interface,
         "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", "ACCEPT"],
        [*ipt, "-t", "filter", "-A", IPT_FORWARD, *inn, "-o", cfg.interface, "-j", "DROP"],
        [*ipt, "-t", "filter", "-I", "FORWARD", "1", "-j", IPT_FORWARD],
    ]  # fmt: skip
    down = [
        [*ipt, "-t", "filter", "-D", "FORWARD", "-j", IPT_FORWARD],
        [*ipt, "-t", "filter", "-F", IPT_FORWARD],
        [*ipt, "-t", "filter", "-X", IPT_FORWARD],
    ]
    return IptablesPlan(up=up, down=down)


def _iptables_v4(cfg: ApConfig, binary: str) -> IptablesPlan:
    ipt = [binary, "-w"]
    out = ["-o", cfg.uplink] if cfg.uplink else ["!", "-o", cfg.interface]
    src = str(cfg.address.network)
    up = [
        [*ipt, "-t", "nat", "-N", IPT_POSTROUTING],
        [*ipt, "-t", "nat", "-A", IPT_POSTROUTING, "-s", src, *out, "-j", "MASQUERADE"],
        [*ipt, "-t", "nat", "-I", "POSTROUTING", "1", "-j", IPT_POSTROUTING],
    ]  # fmt: skip
    fwd = _iptables_forward(cfg, ipt)
    up += fwd.up
    if cfg.protect_host:
        inp = _iptables_input(cfg, ipt, None)
        fwd = IptablesPlan(up=fwd.up + inp.up, down=inp.down + fwd.down)
        up += inp.up
    down = [
        *fwd.down,
        [*ipt, "-t", "nat", "-D", "POSTROUTING", "-j", IPT_POSTROUTING],
        [*ipt, "-t", "nat", "-F", IPT_POSTROUTING],
        [*ipt, "-t", "nat", "-X", IPT_POSTROUTING],
    ]
    return IptablesPlan(up=up, down=down)


def nm_dropin_path(cfg: ApConfig) -> Path:
    """Where the NetworkManager drop-in for this interface goes."""
    return cfg.nm_conf_dir / f"99-flowtruth-{cfg.interface}.conf"


def render_nm_unmanaged(cfg: ApConfig) -> str:
    """A NetworkManager conf.d drop-in that leaves the AP interface unmanaged."""
    return (
        "\n".join([HEADER, "[keyfile]", f"unmanaged-devices+=interface-name:{cfg.interface}"])
        + "\n"
    )
