"""analysis is a pure library: importing all of it pulls in no front end or device code."""

from __future__ import annotations

import subprocess
import sys

FORBIDDEN = ("controller", "ap_setup", "textual", "adbutils")


def test_analysis_imports_no_controller_textual_or_adbutils():
    code = (
        "import pkgutil, importlib, sys, analysis\n"
        "for m in pkgutil.walk_packages(analysis.__path__, 'analysis.'):\n"
        "    importlib.import_module(m.name)\n"
        f"bad = [m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r}]\n"
        "print(','.join(sorted(bad)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_flows_command_start_up_imports_no_heavy_stack():
    code = (
        "import sys, controller.cli\n"
        "print(','.join(m for m in ('pandas','sklearn','textual','numba','adbutils','matplotlib')"
        " if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_flows_parquet_export_runs_without_pandas(tmp_path):
    """The hot path writes Parquet through pyarrow buffers, never importing pandas."""
    from tests.conftest import DATA

    pcap = DATA / "ndpi_pcaps" / "signal.pcap"
    if not pcap.exists():
        import pytest

        pytest.skip("shared data missing")
    code = (
        "import sys\n"
        "from controller.cli import main\n"
        "try:\n"
        f"    main(['flows', {str(pcap)!r}, '--format', 'parquet', '-o', {str(tmp_path / 'o.parquet')!r},"
        " '--label', 'org.thoughtcrime.securesms'])\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0, e.code\n"
        "print('pandas' in sys.modules, 'numba' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False False"
