"""Smoke tests of the real ``flowtruth tui`` in a real terminal (tmux): read the screen
with ``capture-pane``, press keys, quit. Each test runs its own tmux server (``-L``) and
kills it in teardown, so no session or process is left behind."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FLOWTRUTH = REPO / ".venv" / "bin" / "flowtruth"

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None or not FLOWTRUTH.exists(),
                                reason="needs tmux and the flowtruth console script")


class Terminal:
    """One tmux server with one session running a command."""

    def __init__(self, command: str, cwd: Path, size: tuple[int, int] = (100, 30)) -> None:
        self.sock = f"flowtruth-test-{uuid.uuid4().hex[:8]}"
        self.name = "tui"
        # the exit status goes to a file: tmux 3.3 leaves #{pane_dead_status} empty
        self.status_file = cwd / f"{self.sock}.status"
        command = f"{command}; echo $? > {self.status_file}"
        self.tmux("-f", "/dev/null", "new-session", "-d", "-s", self.name, "-x", str(size[0]),
                  "-y", str(size[1]), "-c", str(cwd), command, ";",
                  "set-option", "-t", self.name, "remain-on-exit", "on", ";",
                  "resize-window", "-t", self.name, "-x", str(size[0]), "-y", str(size[1]))

    def tmux(self, *args: str) -> str:
        p = subprocess.run(["tmux", "-L", self.sock, *args], capture_output=True, text=True,
                           timeout=20)
        if p.returncode != 0:
            raise AssertionError(f"tmux {' '.join(args)}: {p.stderr.strip()}")
        return p.stdout

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", self.name)

    def keys(self, *keys: str, settle: float = 0.4) -> None:
        for k in keys:
            self.tmux("send-keys", "-t", self.name, k)
            # a lone Escape is held back briefly by the terminal parser; let it through
            time.sleep(settle if k == "Escape" else 0.1)

    def wait_for(self, cond: Callable[[str], bool] | str, timeout: float = 20.0) -> str:
        check = (lambda s: cond in s) if isinstance(cond, str) else cond
        deadline = time.monotonic() + timeout
        text = ""
        while time.monotonic() < deadline:
            text = self.screen()
            if check(text):
                return text
            time.sleep(0.2)
        raise AssertionError(f"not on screen after {timeout}s: {cond!r}\n{text}")

    def wait_exit(self, timeout: float = 30.0) -> int:
        """The command's exit status, once it has ended."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.status_file.read_text() if self.status_file.exists() else ""
            if text.strip():
                return int(text)
            time.sleep(0.2)
        raise AssertionError(f"the TUI did not exit:\n{self.screen()}")

    def kill(self) -> None:
        subprocess.run(["tmux", "-L", self.sock, "kill-server"], capture_output=True, timeout=20)
        # kill-server leaves the socket file behind
        Path(f"{os.environ.get('TMUX_TMPDIR', '/tmp')}/tmux-{os.getuid()}/{self.sock}").unlink(
            missing_ok=True)


@pytest.fixture
def terminal(tmp_path: Path) -> Iterator[Callable[..., Terminal]]:
    made: list[Terminal] = []

    def start(command: str, size: tuple[int, int] = (100, 30)) -> Terminal:
        t = Terminal(command, tmp_path, size)
        made.append(t)
        return t

    yield start
    for t in made:
        t.kill()


def test_demo_tui_in_a_real_terminal(terminal: Callable[..., Terminal]) -> None:
    """The rehearsal in 100x30: dashboard, keys, a whole plan, results, quit."""
    t = terminal(f"{FLOWTRUTH} tui --demo --demo-tick 0.02 --demo-fail s2-telegram")
    screen = t.wait_for(lambda s: "Plan queue" in s and "q Quit" in s)
    assert len(screen.splitlines()[0]) <= 100
    for text in ("Access point", "Devices", "Log (UTC)", "s1-signal", "queued", "q Quit"):
        assert text in screen
    t.keys("?")
    screen = t.wait_for("Keys  (esc closes")
    assert "pause: finish the running session" in screen
    t.keys("Escape")
    t.wait_for(lambda s: "Keys  (esc closes" not in s)
    t.keys("s")
    screen = t.wait_for("finished  2/3 done, 1 failed", timeout=30)
    assert "R5CR10ABCDE" in screen and "+2.375s" in screen
    t.keys("3")
    screen = t.wait_for(lambda s: "Label quality per session" in s
                        and re.search(r"s1-signal .* ok .*\d+\.\d%", s) is not None)
    assert re.search(r"s2-telegram .* failed", screen)
    t.keys("q")
    assert t.wait_exit(10) == 0


def test_quit_while_running_asks_and_tears_down_at_80x24(
        terminal: Callable[..., Terminal]) -> None:
    t = terminal(f"{FLOWTRUTH} tui --demo --demo-tick 0.3", size=(80, 24))
    t.wait_for("Plan queue")
    t.keys("s")
    t.wait_for("RunScenario")
    t.keys("q")
    screen = t.wait_for("Quit flowtruth?")
    assert "Stop and quit (y)" in screen and "No (n)" in screen  # nothing cut off at 80x24
    t.keys("y")
    assert t.wait_exit(10) == 0


# ---------------------------------------------------------------------------- the lab


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _lab_skip() -> str | None:
    try:
        from controller.lab.topology import skip_reason
    except ImportError:
        return "the virtual lab is not installed"
    if shutil.which("adb") is None:
        return "needs adb"
    return skip_reason()


@pytest.mark.skipif(os.geteuid() != 0, reason="the virtual lab needs root")
def test_lab_tui_provisions_runs_a_session_and_takes_the_lab_down(
        terminal: Callable[..., Terminal], tmp_path: Path) -> None:
    """``flowtruth tui --lab PLAN.yaml`` brings a one-phone lab up in a worker, provisions,
    runs one session, shows its labels, and takes the lab and its adb server down when its
    terminal closes."""
    why = _lab_skip()
    if why:
        pytest.skip(why)
    port = _free_port()
    state = tmp_path / "lab-state"
    plan = tmp_path / "PLAN.yaml"
    plan.write_text("name: tmux-lab\ndevices: [lab:phone1]\napps: [signal]\n"
                    "activities: [chat]\nwait_scale: 0.1\noutput: runs\n")
    try:
        t = terminal(f"{FLOWTRUTH} tui --lab --phones 1 --state-dir {state} --adb-port {port} "
                     f"--mgmt-base 217 {plan}")
        t.wait_for("phone1_signal_chat_r1")
        t.keys("d")
        screen = t.wait_for("provisioned 1 phone", timeout=60)
        assert "x86_64" in screen and "yes" in screen  # ABI and root of the lab phone
        t.wait_for("AP up", timeout=10)
        t.keys("s")
        screen = t.wait_for("finished  1/1 done", timeout=90)
        t.keys("3")
        screen = t.wait_for("Label quality per session")
        assert "phone1_signal_chat_r1" in screen and "%" in screen
        lab_ids = [p.name for p in state.glob("lab-*")]
        # The technician closes the terminal window: the TUI gets SIGHUP and still takes the
        # lab down (quitting with q runs the same teardown; the rehearsal tests quit with q).
        t.kill()
        deadline = time.monotonic() + 60
        while (state / "lab.json").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not (state / "lab.json").exists()
        ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert not any(f"ftl-{i.removeprefix('lab-')}-" in ns for i in lab_ids)
        def adb_listening() -> bool:
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0

        while adb_listening() and time.monotonic() < deadline + 20:
            time.sleep(0.2)
        assert not adb_listening(), "the lab's adb server was left running"
        assert list((tmp_path / "runs").glob("*_phone1_signal_chat_r1/manifest.json"))
    finally:  # whatever failed above, leave no lab and no adb server behind
        from controller.lab.topology import Lab

        left = Lab.load(state)
        if left is not None:
            left.down()
        subprocess.run(["adb", "-P", str(port), "kill-server"], capture_output=True, timeout=20)
