"""hostapd's own parser accepts our rendered files, without a radio.

hostapd reads and validates the whole config file before it opens the driver, and
reports each problem as ``Line N: ...`` followed by ``N errors found in configuration
file``. Run against a non-existent interface, our file must get past parsing and
fail only at driver set-up; a deliberately broken file must fail with line errors.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from ap_setup.render import render_hostapd
from tests.test_ap_render import five_ghz, make_config

pytestmark = pytest.mark.skipif(shutil.which("hostapd") is None, reason="hostapd not installed")

PARSE_ERROR = re.compile(r"^Line \d+: |errors? found in configuration file", re.M)


@pytest.fixture
def netns() -> Iterator[list[str]]:
    """A throw-away namespace when root (hostapd then sees no host interface at all)."""
    if os.geteuid() != 0:
        yield []
        return
    ns = f"fthapd-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        yield ["ip", "netns", "exec", ns]
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def run_hostapd(prefix: list[str], conf: Path) -> str:
    res = subprocess.run(
        [*prefix, "hostapd", "-d", str(conf)], capture_output=True, text=True, timeout=15
    )
    assert res.returncode != 0  # no radio: it can never come up here
    return res.stdout + res.stderr


@pytest.mark.parametrize("make", [make_config, five_ghz], ids=["2.4GHz", "5GHz"])
def test_hostapd_parses_our_file_then_fails_only_at_the_driver(make, netns, tmp_path: Path) -> None:
    cfg = make(interface="ftnoradio0", state_dir=str(tmp_path))
    conf = tmp_path / "hostapd.conf"
    conf.write_text(render_hostapd(cfg))
    out = run_hostapd(netns, conf)
    assert not PARSE_ERROR.search(out), out
    # It got past the parser: the next thing it did was touch the driver / interface.
    assert re.search(r"nl80211|driver|ftnoradio0", out), out


def test_hostapd_reports_line_errors_for_a_broken_file(netns, tmp_path: Path) -> None:
    text = render_hostapd(make_config(interface="ftnoradio0", state_dir=str(tmp_path)))
    text = text.replace("hw_mode=g", "hw_mode=q").replace(
        "wpa_passphrase=correct-horse-battery", "wpa_passphrase=short"
    )
    text += "no_such_option=1\n"
    conf = tmp_path / "broken.conf"
    conf.write_text(text)
    out = run_hostapd(netns, conf)
    lines = re.findall(r"^Line (\d+): (.*)$", out, re.M)
    assert len(lines) >= 3, out
    assert any("hw_mode" in msg for _n, msg in lines)
    assert any("no_such_option" in msg for _n, msg in lines)
    assert "errors found in configuration file" in out
