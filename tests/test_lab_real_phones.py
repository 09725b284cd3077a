"""The virtual lab's phones print what real phones print (../shared/data/android_real): the
presets carry the real getprop dumps' identity, and getprop, pm list packages (both forms),
toybox ps -A, dumpsys battery, ip addr/route (rmnet_data0 before wlan0) come out in the real
formats; failure modes (CRLF output, hostile process names) hold up through a session."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from controller.device import (
    parse_battery,
    parse_getprop,
    parse_ip_addr,
    parse_ip_route,
    parse_pm_list,
    parse_ps,
)
from controller.lab.toolbox import (
    PRESETS,
    Toolbox,
    samsung_s21,
    samsung_s936b,
    xiaomi_24069pc21i,
    xiaomi_poco_x3_pro,
)

REAL = {"samsung": "getprop_samsung_RootMyGalaxy.txt", "xiaomi": "getprop_xiaomi_peridot.txt"}
IDENTITY = ("ro.product.model", "ro.product.manufacturer", "ro.product.brand",
            "ro.product.device", "ro.build.version.release", "ro.build.version.sdk",
            "ro.build.version.security_patch", "ro.build.fingerprint", "ro.build.id",
            "ro.product.cpu.abi", "persist.sys.locale", "ro.product.locale",
            "persist.sys.timezone", "ro.soc.model", "ro.product.board",
            "persist.sys.boot.reason.history")


def run(tb: Toolbox, cmd: str) -> str:
    r = subprocess.run(tb.argv(cmd), env=tb.environment(), capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0, r
    return r.stdout


@pytest.mark.parametrize(("brand", "preset"), [("samsung", samsung_s936b),
                                               ("xiaomi", xiaomi_24069pc21i)])
def test_presets_are_the_real_phones_and_getprop_prints_them_as_real_getprop(
        shared_data: Path, tmp_path: Path, brand: str, preset: object) -> None:
    real = parse_getprop((shared_data / "android_real" / REAL[brand]).read_bytes())
    cfg = preset()  # type: ignore[operator]
    tb = Toolbox(cfg, tmp_path / brand, use_mount_namespace=False)
    tb.prepare()
    out = run(tb, "getprop")
    props = parse_getprop(out)
    for key in IDENTITY:
        assert props[key] == real[key], key
    assert props["ro.serialno"] == real["ro.serialno"]
    # the layout of the real dump: sorted [key]: [value] lines, a value over several lines
    lines = out.splitlines()
    keys = [m.group(1) for x in lines if (m := re.match(r"^\[([^\]]+)\]: \[", x))]
    assert keys == sorted(keys) and len(keys) == len(props)
    assert props["persist.sys.boot.reason.history"].count("\n") >= 2
    assert run(tb, "getprop ro.product.model").strip() == real["ro.product.model"]


def test_old_preset_names_give_the_real_phones() -> None:
    assert samsung_s21().model == "SM-S936B" and xiaomi_poco_x3_pro().model == "24069PC21I"
    assert PRESETS["samsung-sm-s936b"]().model == PRESETS["samsung-sm-g991b"]().model


def test_pm_list_both_forms_in_aosp_order(shared_data: Path, tmp_path: Path) -> None:
    tb = Toolbox(samsung_s936b(), tmp_path / "s", use_mount_namespace=False)
    tb.prepare()
    real_vc = (shared_data / "android_real" / "pm_list_versioncode_aosp_format.txt").read_text()
    real_u = (shared_data / "android_real" / "pm_list_U_oneplus.txt").read_text()
    shape_vc = re.compile(r"^package:[\w.]+ versionCode:\d+ uid:\d+$")
    shape_u = re.compile(r"^package:[\w.]+ uid:\d+$")
    assert all(shape_vc.match(x) for x in real_vc.splitlines())
    assert all(shape_u.match(x) for x in real_u.splitlines())
    vc = run(tb, "pm list packages -U --show-versioncode")
    u = run(tb, "pm list packages -U")
    assert vc.splitlines() and all(shape_vc.match(x) for x in vc.splitlines()), vc
    assert u.splitlines() and all(shape_u.match(x) for x in u.splitlines()), u
    assert parse_pm_list(vc)["org.thoughtcrime.securesms"] == (10263, "1413")
    assert parse_pm_list(u)["org.thoughtcrime.securesms"] == (10263, None)


def test_ps_and_battery_in_the_real_layouts(shared_data: Path, tmp_path: Path) -> None:
    tb = Toolbox(samsung_s936b(), tmp_path / "s", use_mount_namespace=False)
    tb.prepare()
    out = run(tb, "ps -A")
    header, *rows = out.splitlines()
    assert header.split() == ["USER", "PID", "PPID", "VSZ", "RSS", "WCHAN", "ADDR", "S", "NAME"]
    real = (shared_data / "android_real" / "ps_A_samsung_cordova538.txt").read_text()
    real_row = real.splitlines()[0]
    got = parse_ps(out)
    assert len(got) == len(rows) >= 2
    # the column layout is toybox's: a real row re-rendered comes out byte for byte
    from controller.lab.toolbox_runtime import PS_FORMAT, android_user

    r = parse_ps(real_row)[0]
    assert PS_FORMAT.format(r.user, r.pid, r.ppid, r.vsz, r.rss, r.wchan, r.addr, r.state,
                            r.name) == real_row
    assert android_user(10099) == "u0_a99" and android_user(99017) == "u0_i17"
    battery = parse_battery(run(tb, "dumpsys battery"))
    real_b = parse_battery((shared_data / "android_real" /
                            "dumpsys_battery_samsung_mcloud150.txt").read_text())
    assert set(battery) == set(real_b)
    assert battery["level"] == "87"
    xb = Toolbox(xiaomi_24069pc21i(), tmp_path / "x", use_mount_namespace=False)
    xb.prepare()
    assert "Dock powered" in parse_battery(run(xb, "dumpsys battery"))  # AOSP's layout


@pytest.mark.root
@pytest.mark.slow
def test_lab_phones_network_crlf_and_hostile_names_through_sessions(tmp_path: Path) -> None:
    """Phone 1 answers in CRLF and runs an app process whose name holds a newline; phone 2
    one with a 300-character name. Both sessions complete with strace; the phones' addresses
    come from wlan0 although rmnet_data0 is listed first."""
    from controller.device import AdbDeviceLink, read_facts
    from controller.session import Environment, SessionSpec, run_session
    from tests.vlab_fixture import private_lab

    updates = {1: {"crlf_output": True, "hostile_process": "newline"},
               2: {"hostile_process": "long"}}
    with private_lab(tmp_path, phones=2, mgmt_base=215, phone_updates=updates) as pl:
        lab = pl.lab
        env = Environment.for_lab(lab, tmp_path / "runs", launcher_interval=0.2)
        for phone in lab.phones:
            link = AdbDeviceLink(env.client, phone.serial)
            addr = link.shell("ip -o -4 addr").stdout
            route = link.shell("ip route").stdout
            crlf = phone.index == 1
            assert ("\r\n" in addr) == crlf
            names = [a.interface for a in parse_ip_addr(addr)]
            assert names.index("rmnet_data0") < names.index("wlan0"), addr
            assert [a.interface for a in parse_ip_route(route)][0] == "rmnet_data0", route
            f = read_facts(link)
            assert (f.ip, f.ip_source) == (phone.ip, "wifi-interface")
            assert f.model == ("SM-S936B" if phone.index == 1 else "24069PC21I")
            sub = str(lab.ap.subnet)
            assert read_facts(link, subnet=sub).ip_source == "ap-subnet"
            res = run_session(SessionSpec(serial=phone.serial, app="signal", activity="chat",
                                          wait_scale=0.3, device_name=phone.name),
                              link, env, lambda e: None)
            assert res.outcome == "completed", res.error
            m = json.loads((res.run_dir / "manifest.json").read_text())
            procs = {p["name"]: p for p in m["tracers"]["processes"]}
            main = procs["org.thoughtcrime.securesms"]
            assert main["status"] == "attached", m["tracers"]
            hostile = [p for n, p in procs.items() if n != "org.thoughtcrime.securesms"]
            assert len(hostile) == 1, procs
            h = hostile[0]
            # traced; it only sleeps, so strace logged nothing for it (and says so)
            assert h["status"] in ("attached", "no_output"), h
            assert re.fullmatch(r"org\.thoughtcrime\.securesms:[A-Za-z0-9._:-]{1,73}", h["name"])
            logs = m["traces"]["strace"]
            assert any(x.endswith(f"strace.{h['pid']}.{h['name']}.log") for x in logs), logs
            assert all((res.run_dir / x).resolve().parent == (res.run_dir / "strace").resolve()
                       for x in logs)
            assert m["labels"]["flows"] > 0
            # the lab's phones share one pid namespace: stop this phone's app (and its
            # hostile process) before the next phone's launcher scans /proc
            link.shell("am force-stop org.thoughtcrime.securesms")
            pid = h["pid"]
            for _ in range(100):
                if not Path(f"/proc/{pid}").exists():
                    break
                time.sleep(0.1)
            assert not Path(f"/proc/{pid}").exists()


@pytest.mark.parametrize(("arg", "words"), [
    ("1:strace_fault=bogus", "phone1: strace_fault: Input should be"),
    ("1:colour=red", "no phone setting 'colour'"),
    ("5:crlf_output=true", "N from 1 to 2"),
    ("strace_fault", "expected N:FIELD=VALUE"),
])
def test_lab_up_rejects_bad_phone_settings_in_one_line(tmp_path: Path, arg: str,
                                                        words: str) -> None:
    import os
    import sys

    if os.geteuid() != 0:
        pytest.skip("lab up checks root first")
    r = subprocess.run([sys.executable, "-m", "controller.cli", "lab", "up", "--no-adb",
                        "--state-dir", str(tmp_path), "--phone", arg],
                       cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                       timeout=60, env={**os.environ, "COLUMNS": "250"})
    assert r.returncode == 2, r.stderr
    assert words in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "lab.json").exists()
