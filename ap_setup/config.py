"""Typed access-point configuration, loaded from YAML or TOML.

One :class:`ApConfig` drives every renderer (hostapd, dnsmasq, firewall,
NetworkManager) and the bring-up; the virtual lab uses the same model with
``radio: false`` and a veth as ``interface``.
"""

from __future__ import annotations

import ipaddress
import re
import secrets
import tomllib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from controller.errors import ConfigError

_IFNAME = re.compile(r"^[A-Za-z0-9_.:@-]{1,15}$")
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,62})$")
_DNSNAME = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_.-]{0,252})$")
_COUNTRY = re.compile(r"^[A-Z]{2}$")
_LEASE_TIME = re.compile(r"^(infinite|\d+[smhd]?)$")


def _ifname(value: str) -> str:
    if not _IFNAME.match(value):
        raise ValueError(f"not a valid interface name: {value!r}")
    return value


def _mac(value: str) -> str:
    mac = value.strip().lower().replace("-", ":")
    if not _MAC.match(mac):
        raise ValueError(f"not a MAC address: {value!r}")
    return mac


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True)


class StaticLease(_Model):
    """A fixed DHCP lease for one phone."""

    mac: str
    """The phone's Wi-Fi MAC address (turn MAC randomisation off for the AP's SSID)."""
    ip: ipaddress.IPv4Address
    """The address the phone always gets; must lie inside the AP subnet."""
    name: str
    """Host name given to the lease (letters, digits, dashes)."""

    @field_validator("mac")
    @classmethod
    def _check_mac(cls, value: str) -> str:
        return _mac(value)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _HOSTNAME.match(value):
            raise ValueError(f"not a host name: {value!r}")
        return value


class DnsHost(_Model):
    """A DNS name dnsmasq answers itself (``address=/name/ip``), with all its subdomains."""

    name: str
    """Domain name, e.g. ``lab.example``."""
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address
    """The address returned for the name."""

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _DNSNAME.match(value) or ".." in value:
            raise ValueError(f"not a domain name: {value!r}")
        return value


class CaptureConfig(_Model):
    """Packet capture on the AP interface (before NAT, so phones keep their own addresses)."""

    tool: Literal["tcpdump", "dumpcap"] = "tcpdump"
    """Capture program."""
    snaplen: int = Field(default=0, ge=0, le=262144)
    """Bytes kept per packet; 0 keeps full packets, e.g. 128 keeps headers only."""
    ring_file_mb: int | None = Field(default=None, ge=1)
    """Start a new file after this many megabytes (10^6 bytes)."""
    ring_files: int | None = Field(default=None, ge=1)
    """With ``ring_file_mb``: keep only the newest N files (a ring buffer)."""
    rotate_seconds: int | None = Field(default=None, ge=1)
    """Start a new file every N seconds."""
    macs: list[str] = []
    """Capture only frames to or from these MAC addresses (empty: everything)."""
    ips: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    """Capture only packets to or from these addresses (empty: everything)."""
    buffer_mb: int = Field(default=64, ge=1, le=4096)
    """Kernel capture buffer in MiB; larger buffers ride out bursts without drops."""
    immediate: bool = True
    """Hand every packet to the capture program at once (``--immediate-mode``), so none
    are still waiting in the kernel when the capture stops."""
    nano: bool = True
    """Nanosecond time stamps in the pcap (when the capture program supports it)."""

    @field_validator("macs")
    @classmethod
    def _macs(cls, value: list[str]) -> list[str]:
        return [_mac(v) for v in value]


class SupervisionConfig(_Model):
    """Restarting hostapd and dnsmasq when they exit while the AP is up."""

    enabled: bool = True
    """``flowtruth ap up`` leaves a supervisor running that restarts an exited daemon."""
    check_interval: float = Field(default=1.0, gt=0, le=60)
    """Seconds between two looks at the daemons."""
    backoff_initial: float = Field(default=0.5, ge=0, le=600)
    """Seconds to wait before the first restart; doubled for each further restart in
    ``restart_window``."""
    backoff_max: float = Field(default=30.0, ge=0, le=3600)
    """Upper bound of the wait before a restart, in seconds."""
    max_restarts: int = Field(default=5, ge=0, le=1000)
    """Restarts allowed within ``restart_window``; one more exit and the supervisor gives up
    on that daemon (0: never restart, only report)."""
    restart_window: float = Field(default=300.0, gt=0, le=86400)
    """Seconds over which restarts are counted."""
    settle: float = Field(default=0.5, ge=0, le=30)
    """Seconds a restarted daemon must stay alive to count as started."""


class ApConfig(_Model):
    """One access point: radio, addressing, DHCP/DNS, NAT and capture."""

    interface: str = "wlan0"
    """The AP interface: a Wi-Fi interface, or a veth in the virtual lab."""
    uplink: str | None = None
    """Interface towards the internet; NAT goes out there (None: any other interface)."""
    netns: str | None = None
    """Run every command inside this network namespace (``ip netns exec``)."""
    radio: bool = True
    """A real Wi-Fi radio: start hostapd, unblock rfkill. False for a veth (virtual lab)."""

    ssid: str = "flowtruth"
    """Network name (1-32 bytes)."""
    passphrase: str | None = None
    """WPA2 passphrase (8-63 printable ASCII); generated when not given."""
    band: Literal["2.4", "5"] = "2.4"
    """Wi-Fi band in GHz."""
    channel: int = 6
    """Channel number (1-13 on 2.4 GHz; e.g. 36, 40, 44, 48 on 5 GHz)."""
    country_code: str | None = None
    """Two-letter regulatory country (ISO 3166-1), e.g. DE; required for 5 GHz."""
    ieee80211n: bool = True
    """Enable 802.11n (HT)."""
    ieee80211ac: bool = True
    """Enable 802.11ac (VHT); only used on 5 GHz."""
    ap_isolate: bool = True
    """hostapd's ``ap_isolate``: phones cannot reach each other over the Wi-Fi. The rig
    never needs phone-to-phone traffic, and a compromised phone cannot probe the others;
    set false only for an experiment between phones."""

    address: ipaddress.IPv4Interface = ipaddress.IPv4Interface("192.168.50.1/24")
    """The AP's own address and the subnet handed to phones."""
    dhcp_start: ipaddress.IPv4Address | None = None
    """First address of the dynamic DHCP pool (default: .100 of the subnet)."""
    dhcp_end: ipaddress.IPv4Address | None = None
    """Last address of the dynamic DHCP pool (default: .200 of the subnet)."""
    lease_time: str = "12h"
    """DHCP lease time in dnsmasq syntax (e.g. 12h, 3600, infinite)."""
    static_leases: list[StaticLease] = []
    """One fixed lease per phone MAC."""
    dns_hosts: list[DnsHost] = []
    """Names dnsmasq answers itself."""
    upstream_dns: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [
        ipaddress.IPv4Address("1.1.1.1"),
        ipaddress.IPv4Address("9.9.9.9"),
    ]
    """DNS servers dnsmasq forwards to."""
    ipv6_ra: bool = False
    """Send IPv6 router advertisements (SLAAC, stateless DHCPv6) and route IPv6 without NAT,
    so the prefix must be routed to this host upstream; off by default, and IPv6 is then
    disabled on the interface."""
    ipv6_address: ipaddress.IPv6Interface | None = None
    """With ``ipv6_ra``: the AP's own IPv6 address with the /64 prefix advertised to phones,
    e.g. ``fd00:f10e:1::1/64`` (None: use the global address already on the interface)."""

    firewall: Literal["auto", "nft", "iptables"] = "auto"
    """NAT backend: nftables when present, else iptables."""
    protect_host: bool = True
    """Phones reach only DHCP, DNS and ICMP on the AP host itself (plus ``host_ports`` and
    replies to connections the host opened, e.g. ``adb connect`` to a phone); everything
    else they send to the host is dropped, and dnsmasq's DNS/DHCP ports on the AP's
    addresses are closed to the uplink side. Forwarding to the internet is unaffected,
    and the capture still sees every dropped packet. False: phones reach every service
    listening on the host."""
    host_ports: list[str] = []
    """Further ports on the AP host phones may open, as ``tcp/PORT`` or ``udp/PORT``
    (e.g. ``udp/5353`` for mDNS discovery of wireless-debugging phones)."""
    disable_offloads: bool = True
    """Turn GRO/LRO/TSO/GSO off on the AP interface so captured frames match the wire."""
    mtu: int = Field(default=1500, ge=576, le=9000)
    """MTU of the AP link; the capture QA flags larger frames."""
    nm_conf_dir: Path = Path("/etc/NetworkManager/conf.d")
    """Where the NetworkManager 'unmanaged' drop-in goes."""
    state_dir: Path = Path("/var/lib/flowtruth")
    """Where the state file lives (kept across reboots so ``ap down`` still works)."""
    run_dir: Path | None = None
    """Rendered configs, daemon logs and leases (default: ``state_dir/ap-<interface>``)."""
    capture: CaptureConfig = CaptureConfig()
    """Packet capture settings."""
    supervision: SupervisionConfig = SupervisionConfig()
    """Restarting hostapd and dnsmasq when they exit."""

    @field_validator("interface")
    @classmethod
    def _iface(cls, value: str) -> str:
        return _ifname(value)

    @field_validator("uplink")
    @classmethod
    def _uplink(cls, value: str | None) -> str | None:
        return None if value is None else _ifname(value)

    @field_validator("netns")
    @classmethod
    def _netns(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^[A-Za-z0-9_.-]{1,64}$", value):
            raise ValueError(f"not a namespace name: {value!r}")
        return value

    @field_validator("ssid")
    @classmethod
    def _ssid(cls, value: str) -> str:
        if not 1 <= len(value.encode()) <= 32 or any(c in value for c in "\n\r\0"):
            raise ValueError("SSID must be 1-32 bytes without line breaks")
        return value

    @field_validator("passphrase")
    @classmethod
    def _passphrase(cls, value: str | None) -> str | None:
        if value is not None and (
            not 8 <= len(value) <= 63 or not all(32 <= ord(c) < 127 for c in value)
        ):
            raise ValueError("passphrase must be 8-63 printable ASCII characters")
        return value

    @field_validator("country_code")
    @classmethod
    def _country(cls, value: str | None) -> str | None:
        if value is not None:
            value = value.upper()
            if not _COUNTRY.match(value) or value == "00":
                raise ValueError(f"not a two-letter country code: {value!r}")
        return value

    @field_validator("host_ports")
    @classmethod
    def _host_ports(cls, value: list[str]) -> list[str]:
        out = []
        for item in value:
            m = re.fullmatch(r"(tcp|udp)/(\d{1,5})", item.strip().lower())
            if m is None or not 1 <= int(m.group(2)) <= 65535:
                raise ValueError(f"not tcp/PORT or udp/PORT (port 1-65535): {item!r}")
            out.append(f"{m.group(1)}/{int(m.group(2))}")
        return out

    @field_validator("lease_time")
    @classmethod
    def _lease(cls, value: str) -> str:
        if not _LEASE_TIME.match(value):
            raise ValueError(f"not a dnsmasq lease time: {value!r}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ApConfig:
        if self.band == "2.4" and not 1 <= self.channel <= 14:
            raise ValueError(f"channel {self.channel} is not a 2.4 GHz channel (1-14)")
        if self.band == "5" and not 32 <= self.channel <= 177:
            raise ValueError(f"channel {self.channel} is not a 5 GHz channel (32-177)")
        if self.radio and self.band == "5" and self.country_code is None:
            raise ValueError("5 GHz needs country_code (the regulatory domain)")
        if self.uplink is not None and self.uplink == self.interface:
            raise ValueError("uplink must differ from interface")
        net = self.address.network
        if self.address.ip in (net.network_address, net.broadcast_address):
            raise ValueError(f"address {self.address} is not a host address of its subnet")
        start, end = self.pool
        for label, ip in (("dhcp_start", start), ("dhcp_end", end)):
            if ip not in net:
                raise ValueError(f"{label} {ip} is outside {net}")
        if int(start) > int(end):
            raise ValueError("dhcp_start is after dhcp_end")
        v6 = self.ipv6_address
        if v6 is not None:
            if not self.ipv6_ra:
                raise ValueError(
                    "ipv6_address needs ipv6_ra: true (without it IPv6 is off on the interface)"
                )
            if v6.network.prefixlen != 64:
                raise ValueError(f"ipv6_address {v6}: phones configure themselves (SLAAC) "
                                 "only from a /64 prefix")  # fmt: skip
            if (
                v6.ip.is_link_local
                or v6.ip.is_multicast
                or v6.ip.is_loopback
                or v6.ip.is_unspecified
            ):
                raise ValueError(f"ipv6_address {v6} is not a global or unique-local address")
            if v6.ip == v6.network.network_address:
                raise ValueError(f"ipv6_address {v6} is the prefix itself, not a host address")
        seen_mac: set[str] = set()
        seen_ip: set[ipaddress.IPv4Address] = set()
        for lease in self.static_leases:
            if lease.ip not in net or lease.ip == self.address.ip:
                raise ValueError(
                    f"static lease {lease.name}: {lease.ip} is not a free host of {net}"
                )
            if lease.mac in seen_mac or lease.ip in seen_ip:
                raise ValueError(f"static lease {lease.name}: MAC or IP used twice")
            seen_mac.add(lease.mac)
            seen_ip.add(lease.ip)
        return self

    @property
    def pool(self) -> tuple[ipaddress.IPv4Address, ipaddress.IPv4Address]:
        """The dynamic DHCP range (start, end)."""
        net = self.address.network
        base = int(net.network_address)
        start = self.dhcp_start or ipaddress.IPv4Address(base + min(100, net.num_addresses - 3))
        end = self.dhcp_end or ipaddress.IPv4Address(base + min(200, net.num_addresses - 2))
        return start, end

    @property
    def work_dir(self) -> Path:
        """Directory for rendered configs, logs and the lease file."""
        return self.run_dir or self.state_dir / f"ap-{self.interface}"

    @property
    def state_path(self) -> Path:
        """The state file recording what ``ap up`` changed."""
        ns = f"{self.netns}-" if self.netns else ""
        return self.state_dir / f"ap-{ns}{self.interface}.state.json"

    def with_passphrase(self) -> ApConfig:
        """This config with a generated passphrase when none was given."""
        if self.passphrase is not None:
            return self
        return self.model_copy(update={"passphrase": generate_passphrase()})


def generate_passphrase() -> str:
    """A random 20-character WPA2 passphrase a technician can type on a phone."""
    alphabet = "abcdefghijkmnpqrstuvwxyz23456789"
    return "".join(secrets.choice(alphabet) for _ in range(20))


def _field_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def config_from_mapping(data: Any, source: str = "<config>") -> ApConfig:
    """Validate a parsed mapping; errors name the source and the field."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of AP settings at the top level")
    if isinstance(data.get("ap"), dict) and len(data) == 1:
        data = data["ap"]
    try:
        return ApConfig.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = _field_path(tuple(first.get("loc", ())))
        msg = first.get("msg", "invalid").removeprefix("Value error, ")
        more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
        raise ConfigError(f"{source}: {where}: {msg}{more}") from None


def load_config(path: str | Path) -> ApConfig:
    """Load an :class:`ApConfig` from a YAML (.yaml/.yml) or TOML (.toml) file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such config file") from None
    except OSError as err:
        raise ConfigError(f"{p}: cannot read: {err.strerror}") from None
    try:
        if p.suffix.lower() == ".toml":
            data: Any = tomllib.loads(text)
        else:
            data = yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as err:
        raise ConfigError(
            f"{p}: not valid {'TOML' if p.suffix == '.toml' else 'YAML'}: {err}"
        ) from None
    return config_from_mapping(data, str(p))
