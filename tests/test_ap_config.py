"""The typed AP config: defaults, validation, YAML/TOML loading, errors naming file and field."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from ap_setup.config import (
    ApConfig,
    CaptureConfig,
    SupervisionConfig,
    config_from_mapping,
    generate_passphrase,
    load_config,
)
from controller.errors import ConfigError

YAML = """\
ap:
  interface: wlan1
  uplink: eth0
  ssid: flowtruth-lab
  country_code: de
  band: "5"
  channel: 36
  address: 10.42.0.1/24
  static_leases:
    - {mac: "AA:BB:CC:DD:EE:01", ip: 10.42.0.11, name: pixel-7}
  dns_hosts:
    - {name: probe.lab, ip: 10.42.0.1}
  capture:
    snaplen: 128
    ring_file_mb: 100
    ring_files: 10
    macs: ["aa:bb:cc:dd:ee:01"]
"""

TOML = """\
interface = "wlan1"
uplink = "eth0"
country_code = "DE"
band = "5"
channel = 36
address = "10.42.0.1/24"

[[static_leases]]
mac = "aa:bb:cc:dd:ee:01"
ip = "10.42.0.11"
name = "pixel-7"

[[dns_hosts]]
name = "probe.lab"
ip = "10.42.0.1"

[capture]
snaplen = 128
ring_file_mb = 100
ring_files = 10
macs = ["aa:bb:cc:dd:ee:01"]
"""


def test_yaml_and_toml_give_the_same_config(tmp_path: Path) -> None:
    (tmp_path / "ap.yaml").write_text(YAML)
    (tmp_path / "ap.toml").write_text(TOML)
    a = load_config(tmp_path / "ap.yaml")
    b = load_config(tmp_path / "ap.toml")
    assert a.model_dump(exclude={"ssid"}) == b.model_dump(exclude={"ssid"})
    assert a.country_code == "DE"
    assert a.static_leases[0].mac == "aa:bb:cc:dd:ee:01"
    assert a.capture.snaplen == 128
    assert a.pool == (ipaddress.IPv4Address("10.42.0.100"), ipaddress.IPv4Address("10.42.0.200"))


def test_defaults_are_a_valid_2ghz_ap() -> None:
    cfg = ApConfig()
    assert (cfg.interface, cfg.band, cfg.channel, cfg.radio) == ("wlan0", "2.4", 6, True)
    assert cfg.work_dir == Path("/var/lib/flowtruth/ap-wlan0")
    assert ApConfig(netns="lab").state_path.name == "ap-lab-wlan0.state.json"


def test_every_field_has_a_docstring() -> None:
    for model in (ApConfig, SupervisionConfig, CaptureConfig):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name}"


def test_ipv6_address_and_supervision_settings() -> None:
    cfg = config_from_mapping(
        {"ipv6_ra": True, "ipv6_address": "fd00:f10e:1::1/64",
         "supervision": {"max_restarts": 2, "check_interval": 0.1}}
    )  # fmt: skip
    assert str(cfg.ipv6_address.network) == "fd00:f10e:1::/64"
    assert cfg.supervision.max_restarts == 2 and cfg.supervision.enabled
    assert ApConfig().ipv6_ra is False and ApConfig().ipv6_address is None


@pytest.mark.parametrize(
    ("data", "where", "why"),
    [
        ({"channel": 40}, "(top level)", "not a 2.4 GHz channel"),
        ({"band": "5", "channel": 36}, "(top level)", "needs country_code"),
        ({"passphrase": "short"}, "passphrase", "8-63"),
        ({"interface": "wlan0; rm -rf /"}, "interface", "not a valid interface name"),
        ({"static_leases": [{"mac": "zz", "ip": "192.168.50.9", "name": "a"}]}, "static_leases[0].mac", "not a MAC"),
        ({"static_leases": [{"mac": "aa:bb:cc:dd:ee:ff", "ip": "10.0.0.9", "name": "a"}]}, "(top level)", "not a free host"),
        ({"capture": {"snaplen": -1}}, "capture.snaplen", "greater than or equal"),
        ({"colour": "blue"}, "colour", "Extra inputs"),
        ({"dhcp_start": "192.168.50.200", "dhcp_end": "192.168.50.100"}, "(top level)", "after dhcp_end"),
        ({"ipv6_address": "fd00::1/64"}, "(top level)", "needs ipv6_ra: true"),
        ({"ipv6_ra": True, "ipv6_address": "fd00::1/56"}, "(top level)", "only from a /64 prefix"),
        ({"ipv6_ra": True, "ipv6_address": "fe80::1/64"}, "(top level)", "not a global or unique-local"),
        ({"ipv6_ra": True, "ipv6_address": "fd00::/64"}, "(top level)", "the prefix itself"),
        ({"ipv6_ra": True, "ipv6_address": "10.0.0.1/24"}, "ipv6_address", "valid IPv6"),
        ({"supervision": {"check_interval": 0}}, "supervision.check_interval", "greater than 0"),
        ({"supervision": {"restarts": 3}}, "supervision.restarts", "Extra inputs"),
        ({"host_ports": ["5555"]}, "host_ports", "not tcp/PORT or udp/PORT"),
        ({"host_ports": ["tcp/70000"]}, "host_ports", "port 1-65535"),
        ({"host_ports": ["sctp/9"]}, "host_ports", "not tcp/PORT"),
    ],
)  # fmt: skip
def test_errors_name_the_file_and_field(data: dict, where: str, why: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_mapping(data, "lab/ap.yaml")
    msg = str(info.value)
    assert msg.startswith(f"lab/ap.yaml: {where}: "), msg
    assert why in msg
    assert info.value.exit_code == 2


def test_file_errors_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.toml"
    bad.write_text("interface = \n")
    with pytest.raises(ConfigError, match="bad.toml: not valid TOML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(listy)


def test_generated_passphrases_are_valid_and_differ() -> None:
    a, b = generate_passphrase(), generate_passphrase()
    assert a != b and len(a) == 20
    ApConfig(passphrase=a)


def test_host_is_protected_and_phones_isolated_by_default() -> None:
    cfg = ApConfig()
    assert cfg.protect_host and cfg.ap_isolate and cfg.host_ports == []
    assert ApConfig(host_ports=[" TCP/5555 ", "udp/05353"]).host_ports == ["tcp/5555", "udp/5353"]
