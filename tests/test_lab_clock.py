"""A lab phone's clock offset reaches every program run through its shell (libfaketime)."""

from __future__ import annotations

import shutil
import subprocess
import time

import pytest

from controller.lab.toolbox import Toolbox, libfaketime_path, samsung_s21


@pytest.mark.skipif(libfaketime_path() is None, reason="libfaketime (Debian faketime) missing")
@pytest.mark.skipif(shutil.which("strace") is None, reason="strace missing")
def test_strace_date_and_programs_see_the_phone_clock(tmp_path):
    cfg = samsung_s21(clock_offset_s=3.5)
    tb = Toolbox(cfg, tmp_path / "phone", use_mount_namespace=False)
    tb.prepare()
    cmd = ("date +%s.%N; su -c \"python3 -c 'import time; print(time.time())'\"; "
           f"strace -ttt -e trace=getpid -o {tmp_path}/st.log python3 -c 'import os; os.getpid()';"
           f" cat {tmp_path}/st.log")
    host = time.time()
    out = subprocess.run(tb.argv(cmd), env=tb.environment(), capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split()
    date_s, py_s = float(lines[0]), float(lines[1])
    strace_s = float(next(ln.split()[0] for ln in out.stdout.splitlines() if "getpid" in ln))
    for value in (date_s, py_s, strace_s):
        assert abs(value - host - 3.5) < 1.5, (value - host, out.stdout)
    # the toolbox's own date does not add the offset a second time; su keeps the clock
    assert abs(date_s - py_s) < 1.0
