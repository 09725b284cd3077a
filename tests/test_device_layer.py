"""The device layer: parsers and checks over a recording fake, then the same calls end to end
through the real adb server and adbutils against an emulated adbd (a phone vanishing
mid-call included)."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.device import (
    AdbDeviceLink,
    RecordingDeviceLink,
    ShellResult,
    adb_client,
    check_root,
    estimate_offset,
    parse_addresses,
    parse_battery_level,
    parse_getprop,
    parse_pm_list,
    preflight,
    probe_clock,
    pull_checked,
    push_checked,
    read_apps,
    read_facts,
    require_root,
    shell_many,
)
from controller.errors import DeviceError, RootRequired

ADB = shutil.which("adb")

GETPROP = """[ro.product.model]: [SM-G991B]
[ro.product.manufacturer]: [samsung]
[ro.build.version.release]: [14]
[ro.build.version.sdk]: [34]
[ro.product.cpu.abi]: [arm64-v8a]
"""


def make_phone(**settings: str) -> RecordingDeviceLink:
    """A fake rooted Samsung on 192.168.77.11 with the three messengers installed."""
    link = RecordingDeviceLink(serial="R5CR10ABCDE")
    link.on(r"^getprop$", GETPROP).on(r"^getenforce$", "Enforcing\n")
    link.on(r"^dumpsys battery$", "Current Battery Service state:\n  level: 87\n  scale: 100\n")
    link.on(r"^ip -o addr$", "1: lo    inet 127.0.0.1/8 scope host lo\n"
                             "9: wlan0    inet 192.168.77.11/24 brd 192.168.77.255 scope global wlan0\n"
                             "9: wlan0    inet6 fe80::1/64 scope link\n")
    link.on(r"/sys/class/net", "lo 00:00:00:00:00:00\nwlan0 02:66:74:00:00:01\n")
    link.on(r"^su -c id$", "uid=0(root) gid=0(root) groups=0(root) context=u:r:magisk:s0\n")
    link.on(r"^magisk -v", "26.4:MAGISK\n")
    link.on(r"^pm list packages", "package:android versionCode:34 uid:1000\n"
                                  "package:org.thoughtcrime.securesms versionCode:1413 uid:10263\n"
                                  "package:com.whatsapp versionCode:241175001 uid:10234\n")
    link.on(r"dumpsys package org.thoughtcrime.securesms", "    versionName=7.8.1\n")
    link.on(r"dumpsys package com.whatsapp", "    versionName=2.24.11.75\n")
    for key, value in settings.items():
        link.on(rf"settings get \w+ {key}$", value + "\n")
    return link


# ----------------------------------------------------------------------------- parsers


def test_parsers_read_real_command_output() -> None:
    assert parse_getprop(GETPROP)["ro.product.cpu.abi"] == "arm64-v8a"
    assert parse_battery_level("  AC powered: false\n  level: 42\n  scale: 100\n") == 42
    assert parse_battery_level("nothing") is None
    assert parse_addresses("2: wlan0 inet 10.0.0.2/24 x\n2: wlan0 inet6 fe80::1/64\n"
                           "2: wlan0 inet6 2001:db8::2/64\n1: lo inet 127.0.0.1/8\n") == \
        ["10.0.0.2", "2001:db8::2"]
    pm = parse_pm_list("package:a.b versionCode:3 uid:10001\npackage:c.d uid:10002\njunk\n")
    assert pm == {"a.b": (10001, "3"), "c.d": (10002, None)}


def test_read_facts_root_and_apps_from_a_fake_phone() -> None:
    link = make_phone()
    f = read_facts(link)
    assert (f.model, f.manufacturer, f.android, f.abi, f.selinux, f.battery_level) == \
        ("SM-G991B", "samsung", "14", "arm64-v8a", "Enforcing", 87)
    assert f.ip == "192.168.77.11" and f.mac == "02:66:74:00:00:01"
    root = require_root(link)
    assert root.rooted and root.method == "su -c" and root.magisk == "26.4:MAGISK"
    apps = read_apps(link, ["org.thoughtcrime.securesms", "com.whatsapp", "org.telegram.messenger"])
    assert apps["org.thoughtcrime.securesms"].uid == 10263
    assert apps["org.thoughtcrime.securesms"].version == "7.8.1"
    assert "org.telegram.messenger" not in apps  # not installed: left out, caller decides
    assert len(link.calls) <= 8  # facts in one round trip


def test_root_falls_back_to_su_0_and_fails_cleanly() -> None:
    link = make_phone().on(r"^su -c id$", ShellResult("", 1, "", "su: invalid option"))
    link.on(r"^su 0 id$", "uid=0(root) gid=0(root)\n")
    assert check_root(link).method == "su 0"
    unrooted = make_phone().on(r"^su ", ShellResult("", 127, "", "/system/bin/sh: su: not found"))
    unrooted.on(r"^magisk", ShellResult("", 127, "", "not found"))
    assert not check_root(unrooted).rooted
    with pytest.raises(RootRequired, match="R5CR10ABCDE"):
        require_root(unrooted)


def test_clock_probe_median_and_uncertainty() -> None:
    # The phone runs 2.5 s ahead; round trips of 20 ms, one outlier of 400 ms.
    host = iter([100.0, 100.02, 101.0, 101.02, 102.0, 102.4, 103.0, 103.02, 104.0, 104.02])
    phone = iter(["102.51", "103.51", "104.7", "105.51", "106.51"])
    link = RecordingDeviceLink().on(r"^date \+%s\.%N$", lambda _c: next(phone) + "\n")
    c = probe_clock(link, probes=5, clock=lambda: next(host))
    assert c.offset_s == pytest.approx(2.5, abs=1e-6)
    assert c.uncertainty_s == pytest.approx(0.01, abs=1e-6)
    assert len(c.samples) == 5
    assert estimate_offset([(0.0, 5.0, 1.0)]) == (4.5, 0.5)
    bad = RecordingDeviceLink().on(r"^date", "%N\n")
    with pytest.raises(DeviceError, match="date"):
        probe_clock(bad)


def test_preflight_warns_what_a_technician_must_fix() -> None:
    link = make_phone(mobile_data="1", airplane_mode_on="1", private_dns_mode="hostname")
    link.on(r"^locksettings get-disabled$", "false\n")
    link.on(r"^dumpsys battery$", "  level: 9\n")
    link.on(r"^ip -o addr$", "9: wlan0 inet 192.168.77.11/24 x\n9: wlan0 inet6 2001:db8::11/64 x\n")
    checks = {w.check for w in preflight(link)}
    assert checks == {"mobile_data", "airplane_mode", "private_dns", "screen_lock", "ipv6",
                      "battery"}
    assert preflight(make_phone(mobile_data="0", private_dns_mode="off")) == []


def test_push_and_pull_compare_checksums(tmp_path: Path) -> None:
    src = tmp_path / "script.sh"
    src.write_bytes(b"#!/bin/sh\necho hi\n")
    link = RecordingDeviceLink()
    sha = push_checked(link, src, "/data/local/tmp/script.sh")
    assert sha == hashlib.sha256(src.read_bytes()).hexdigest()
    size, got = pull_checked(link, "/data/local/tmp/script.sh", tmp_path / "back.sh")
    assert (size, got) == (len(src.read_bytes()), sha)
    # a phone whose sha256sum disagrees (corrupted transfer)
    liar = RecordingDeviceLink().on(r"^sha256sum", "0" * 64 + "  x\n")
    with pytest.raises(DeviceError, match="checksum"):
        push_checked(liar, src, "/data/local/tmp/script.sh")


def test_shell_many_splits_outputs_and_a_vanished_phone_raises() -> None:
    link = RecordingDeviceLink().on("^a$", "one\n").on("^b$", "two\nlines\n")
    assert shell_many(link, ["a", "b", "c"]) == ["one", "two\nlines", ""]
    gone = make_phone()
    gone.vanish_after = 0
    with pytest.raises(DeviceError, match="R5CR10ABCDE"):
        read_facts(gone)


# ----------------------------------------------------------------------------- end to end


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def adb_phone() -> Iterator[tuple[object, AdbDeviceLink, object]]:
    if ADB is None:
        pytest.skip("the Debian adb package is not installed")
    from controller.lab.adbd import EmulatedAdbd
    from controller.lab.toolbox import samsung_s21

    with tempfile.TemporaryDirectory(prefix="flowtruth-devtest-") as d:
        home = Path(d) / "home"
        home.mkdir()
        port = _free_port()
        env = dict(os.environ, HOME=str(home), ANDROID_USER_HOME=str(home / ".android"),
                   TMPDIR=str(home))

        def adb(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([str(ADB), "-P", str(port), *args], env=env, text=True,
                                  capture_output=True, timeout=30, stdin=subprocess.DEVNULL)

        assert adb("start-server").returncode == 0
        adbd = EmulatedAdbd(samsung_s21(clock_offset_s=2.375), "127.0.0.1", 0,
                            Path(d) / "phone").start()
        try:
            client = adb_client(port, socket_timeout=10)
            from controller.device import connect

            serial = connect(client, adbd.address)
            yield adbd, AdbDeviceLink(client, serial), client
        finally:
            adb("disconnect", adbd.address)
            adbd.stop()
            adb("kill-server")


def test_e2e_facts_root_apps_clock_through_the_real_adb_server(adb_phone) -> None:  # type: ignore[no-untyped-def]
    _adbd, link, _client = adb_phone
    f = read_facts(link)
    assert (f.model, f.manufacturer, f.android, f.abi) == ("SM-S936B", "samsung", "16",
                                                           "arm64-v8a")
    assert f.locale == "es-ES"  # persist.sys.locale of the real Samsung's dump
    assert f.battery_level == 87 and f.selinux == "Enforcing"
    root = require_root(link)
    assert root.method == "su -c" and "MAGISK" in (root.magisk or "")
    apps = read_apps(link, ["org.thoughtcrime.securesms", "org.telegram.messenger",
                            "com.whatsapp"])
    assert {a.uid for a in apps.values()} == {10263, 10251, 10234}
    assert apps["com.whatsapp"].version == "2.24.11.75"
    c = probe_clock(link)
    assert len(c.samples) >= 5
    assert abs(c.offset_s - 2.375) <= c.uncertainty_s + 0.05
    # no namespace here: the "phone" shows the host's addresses, so IPv6 may be on
    assert {w.check for w in preflight(link, f)} <= {"ipv6"}


def test_e2e_push_pull_checksummed(adb_phone, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _adbd, link, _client = adb_phone
    blob = tmp_path / "blob.bin"
    blob.write_bytes(os.urandom(300_000))
    sha = push_checked(link, blob, "/data/local/tmp/blob.bin", mode=0o644)
    size, got = pull_checked(link, "/data/local/tmp/blob.bin", tmp_path / "back.bin")
    assert (size, got) == (300_000, sha)
    with pytest.raises(DeviceError, match=link.serial):
        link.pull("/data/local/tmp/does-not-exist", tmp_path / "x")


def test_e2e_cli_devices_lists_the_phone(adb_phone) -> None:  # type: ignore[no-untyped-def]
    import sys

    _adbd, link, client = adb_phone
    r = subprocess.run([sys.executable, "-m", "controller.cli", "devices", "--adb-port",
                        str(client.port), "--no-clock"], capture_output=True, text=True,
                       timeout=60, cwd=Path(__file__).resolve().parents[1],
                       env={**os.environ, "COLUMNS": "250"})
    assert r.returncode == 0, r.stderr
    for text in (link.serial, "SM-S936B", "16 / arm64-v8a", "87 %", "Enforcing", "su -c",
                 "org.thoughtcrime.securesms (10263, 7.8.1)"):
        assert text in r.stdout, (text, r.stdout)


def test_e2e_a_phone_vanishing_mid_call_is_a_device_error_not_a_hang(adb_phone) -> None:  # type: ignore[no-untyped-def]
    adbd, link, _client = adb_phone
    box: dict[str, BaseException | ShellResult] = {}

    def call() -> None:
        try:
            box["r"] = link.shell("sleep 30", timeout=60)
        except BaseException as err:
            box["r"] = err

    t = threading.Thread(target=call)
    t0 = time.monotonic()
    t.start()
    time.sleep(0.5)
    adbd.stop()  # the phone is gone: every connection drops
    t.join(timeout=20)
    assert not t.is_alive(), "the shell call hung after the phone vanished"
    assert time.monotonic() - t0 < 20
    r = box["r"]
    assert isinstance(r, DeviceError) or (isinstance(r, ShellResult) and not r.ok), r
    with pytest.raises(DeviceError, match=link.serial):
        link.shell("id", timeout=5)

