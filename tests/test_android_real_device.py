"""The device layer against real Android output nobody here wrote (../shared/data/android_real,
see its PROVENANCE.md): getprop dumps of three phones (one UTF-16LE with CRLF), ``ip -o -4
addr`` and ``ip route`` with mobile data on, toybox ``ps -A`` and Samsung's ``dumpsys battery``."""

from __future__ import annotations

from pathlib import Path

import pytest

from controller.device import (
    RecordingDeviceLink,
    ShellResult,
    choose_ap_address,
    decode_text,
    parse_battery,
    parse_battery_level,
    parse_dnsmasq_leases,
    parse_getprop,
    parse_ip_addr,
    parse_ip_route,
    parse_ps,
    props_locale,
    read_facts,
)

REAL = "android_real"


def real(shared_data: Path, name: str) -> Path:
    return shared_data / REAL / name


@pytest.mark.parametrize(
    ("name", "model", "manufacturer", "sdk", "release", "locale", "product_locale", "n_min"),
    [
        ("getprop_samsung_RootMyGalaxy.txt", "SM-S936B", "samsung", "36", "16", "es-ES", "en-GB",
         1500),
        ("getprop_xiaomi_peridot.txt", "24069PC21I", "Xiaomi", "35", "15", "en-IN", "en-US", 1000),
        ("getprop_xiaomi_redwood.txt", "22101320G", "Xiaomi", "31", "12", "en-GB", "en-GB", 900),
    ],
)
def test_getprop_dumps_of_three_real_phones(shared_data: Path, name: str, model: str,
                                            manufacturer: str, sdk: str, release: str,
                                            locale: str, product_locale: str, n_min: int) -> None:
    raw = real(shared_data, name).read_bytes()
    props = parse_getprop(raw)
    assert len(props) >= n_min
    assert props["ro.product.model"] == model
    assert props["ro.product.manufacturer"] == manufacturer
    assert props["ro.build.version.sdk"] == sdk
    assert props["ro.build.version.release"] == release
    assert props["persist.sys.locale"] == locale
    assert props["ro.product.locale"] == product_locale
    assert props_locale(props) == locale
    # a value over several lines (boot reasons) is kept whole, and the next key still parses
    history = props["persist.sys.boot.reason.history"]
    assert history.count("\n") >= 2 and not history.endswith("]")
    assert all("\r" not in v and "\x00" not in v for v in props.values())
    # the same text read as a str (what adb hands over), and with CRLF line ends
    text = decode_text(raw)
    assert parse_getprop(text) == props
    assert parse_getprop(text.replace("\n", "\r\n")) == props


def test_samsung_dump_is_utf16le_with_crlf_and_each_encoding_reads_the_same(
        shared_data: Path) -> None:
    raw = real(shared_data, "getprop_samsung_RootMyGalaxy.txt").read_bytes()
    assert raw[:2] == b"\xff\xfe" and b"\r\x00\n\x00" in raw
    props = parse_getprop(raw)
    assert props["ro.serialno"] == "R5CY743GDFY"
    assert props["persist.sys.boot.reason.history"].splitlines() == [
        "reboot,1784638255", "reboot,userrequested,1784637108", "reboot,lpm,1784545284"]
    text = decode_text(raw)
    for enc in ("utf-16-be", "utf-16-le", "utf-8-sig"):
        assert parse_getprop(text.encode(enc)) == props, enc
    # UTF-16 bytes that reached us as a one-byte string (NULs between the characters)
    assert parse_getprop(raw.decode("latin-1")) == props


def test_ip_addr_and_route_of_real_phones(shared_data: Path) -> None:
    addrs = parse_ip_addr(real(shared_data, "ip_o_4_addr_wadb28.txt").read_text())
    assert [(a.interface, a.address, a.prefix) for a in addrs] == [("eth0", "192.168.1.130", 24)]
    routes = parse_ip_route(real(shared_data, "ip_route_rmnet_gnome10.txt").read_text())
    assert [(a.interface, a.address, a.prefix) for a in routes] == [
        ("rmnet_data0", "1.243.25.186", 30), ("wlan0", "192.168.1.14", 24)]
    # mobile data is listed first: the phone's address at the AP is still the Wi-Fi one
    assert choose_ap_address(routes) == ("192.168.1.14", "wifi-interface")
    assert choose_ap_address(routes, subnet="192.168.1.0/24") == ("192.168.1.14", "ap-subnet")
    leases = parse_dnsmasq_leases("1900000000 02:66:74:00:00:01 192.168.1.14 phone1 *\n"
                                  "junk line\n")
    assert choose_ap_address(routes, mac="02:66:74:00:00:01", leases=leases,
                             subnet="192.168.1.0/24") == ("192.168.1.14", "dhcp-lease")
    assert choose_ap_address(addrs, subnet="10.0.0.0/8") == ("192.168.1.130", "first")


def test_read_facts_takes_the_address_on_the_ap_subnet_not_mobile_data(
        shared_data: Path) -> None:
    getprop = real(shared_data, "getprop_xiaomi_peridot.txt").read_text()
    route = real(shared_data, "ip_route_rmnet_gnome10.txt").read_text()
    link = RecordingDeviceLink(serial="f89a5ec6")
    link.on(r"^getprop$", getprop).on(r"^getenforce$", "Enforcing\r\n")
    link.on(r"^dumpsys battery$",
            real(shared_data, "dumpsys_battery_samsung_mcloud150.txt").read_text())
    link.on(r"^ip -o addr$",
            "1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever\n"
            "25: rmnet_data0    inet 1.243.25.186/30 scope global rmnet_data0\\       valid_lft\n"
            "31: wlan0    inet 192.168.1.14/24 brd 192.168.1.255 scope global wlan0\\       x\n")
    link.on(r"^ip route$", route)
    # Android 10+: the shell user may not read the MACs; root can
    link.on(r"/sys/class/net/\*", "lo \nrmnet_data0 \nwlan0 \n")
    link.on(r"^su -c 'cat /sys/class/net/wlan0/address'$", "ae:12:34:56:78:9a\n")
    f = read_facts(link)
    assert (f.model, f.manufacturer, f.android, f.sdk, f.locale) == (
        "24069PC21I", "Xiaomi", "15", "35", "en-IN")
    assert f.addresses[0] == "1.243.25.186"  # what the old "first IPv4" rule took
    assert (f.ip, f.ip_source, f.mac) == ("192.168.1.14", "wifi-interface", "ae:12:34:56:78:9a")
    assert f.battery_level == 100 and f.selinux == "Enforcing"
    leases = {"ae:12:34:56:78:9a": "192.168.1.14"}
    f = read_facts(link, subnet="192.168.1.0/24", leases=leases)
    assert (f.ip, f.ip_source) == ("192.168.1.14", "dhcp-lease")
    assert f.to_manifest()["ip"] == "192.168.1.14"


def test_toybox_ps_rows_of_a_samsung(shared_data: Path) -> None:
    rows = parse_ps(real(shared_data, "ps_A_samsung_cordova538.txt").read_text())
    assert len(rows) == 6
    chrome = next(r for r in rows if r.name == "com.android.chrome")
    assert (chrome.user, chrome.pid, chrome.ppid, chrome.rss, chrome.state) == (
        "u0_a99", 7060, 609, 63452, "S")
    assert rows[2].name == "[kworker/u9:0]" and rows[2].user == "root"
    assert {r.name for r in rows if r.user == "u0_a99"} == {
        "com.android.chrome", "com.android.chrome:privileged_process0"}
    header = "USER           PID  PPID     VSZ    RSS WCHAN            ADDR S NAME\n"
    assert parse_ps(header + "u0_a1 5 1 2 3 0 0 S my app\r\n")[0].name == "my app"


def test_samsung_dumpsys_battery(shared_data: Path) -> None:
    text = real(shared_data, "dumpsys_battery_samsung_mcloud150.txt").read_text()
    b = parse_battery(text)
    assert parse_battery_level(text) == 100
    assert (b["level"], b["scale"], b["USB powered"], b["status"], b["temperature"]) == (
        "100", "100", "true", "5", "309")
    assert b["technology"] == "Li-ion" and b["USE_FAKE_BATTERY"] == "false"
    assert b["Charge counter"] == "2967000"


def test_tracing_check_reads_selinux_yama_and_a_failed_attach() -> None:
    from controller.device import check_tracing

    magisk596 = ("selinux:Enforcing\nyama:1\nptrace:failed\n"
                 "/data/local/tmp/flowtruth/bin/strace: Process 4242 attached\n"
                 "/data/local/tmp/flowtruth/bin/strace: wait4(__WALL): Permission denied\n"
                 "/data/local/tmp/flowtruth/bin/strace: Process 4242 detached\n")
    link = RecordingDeviceLink().on(r"^su -c ", magisk596)
    facts, warns = check_tracing(link)
    assert (facts.selinux, facts.ptrace_scope, facts.root_ptrace, facts.cause) == (
        "Enforcing", 1, "failed", "selinux")
    assert [w.check for w in warns] == ["root_ptrace"]
    assert "wait4(__WALL): Permission denied" in warns[0].message
    assert "setenforce 0" in warns[0].fix
    yama3 = RecordingDeviceLink().on(r"^su -c ", "selinux:Permissive\r\nyama:3\r\nptrace:failed\r\n"
                                     "strace: attach: ptrace(PTRACE_SEIZE, 9): Operation not "
                                     "permitted\r\n")
    facts, warns = check_tracing(yama3)
    assert (facts.ptrace_scope, facts.cause) == (3, "ptrace")
    assert [w.check for w in warns] == ["ptrace_scope", "root_ptrace"]
    assert "reboot" in warns[0].fix and "ptrace_scope" in warns[1].fix
    ok = RecordingDeviceLink().on(r"^su -c ", "selinux:Enforcing\nyama:0\nptrace:ok\n")
    assert check_tracing(ok) == (check_tracing(ok)[0], [])
    assert check_tracing(ok)[0].root_ptrace == "ok"
    unrooted = RecordingDeviceLink().on(r"^su ", ShellResult("", 127, "", "su: not found"))
    facts, warns = check_tracing(unrooted)
    assert (facts.root_ptrace, warns) == ("unchecked", [])
