"""Typing text: the ``input text`` escaping, ADBKeyBoard's broadcasts, the lab phone's text
field that receives both, and text typed through the real adb server into the virtual lab.

The property tests run the lab toolbox's real shell (``/bin/sh`` and the toolbox shims) on
the host: whatever text goes in, exactly that text arrives in the focused field and no
part of it runs as a command.
"""

from __future__ import annotations

import base64
import json
import os
import shlex
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controller.device import (
    ADB_KEYBOARD_IME,
    DEFAULT_TIMEOUT_S,
    RecordingDeviceLink,
    ShellResult,
    input_text_args,
    input_text_commands,
    type_text,
    type_with_adb_keyboard,
)
from controller.errors import DeviceError
from controller.lab import toolbox_runtime as rt
from controller.lab.toolbox import PhoneConfig, Toolbox, samsung_s21
from controller.scenario import ScenarioRunner, load_scenario, parse_screen

WHATSAPP = "com.whatsapp"
EDITOR = "com.whatsapp:id/entry"
EDITOR_BOUNDS = (150, 2200, 920, 2320)
SAMSUNG_IME = "com.samsung.android.honeyboard/.service.HoneyBoardService"
MARKER = Path(tempfile.gettempdir()) / f"flowtruth-typed-a-command-{uuid.uuid4().hex}"
HOSTILE = ["'", '"', "\\", "`", "$", "$(id)", f"$(touch {MARKER})", f"`touch {MARKER}`",
           f"; touch {MARKER}", f"' ; touch {MARKER} ; '", "&&", "|", "<", ">", "(", ")", "*",
           "~", "!", "#", "%", "%s", "%%s", "\\%s", " ", "  ", "-d", "--es", "é", "ü", "👋",
           "🇮🇹", "👩‍👩‍👧", "日本語", "\u200b", "\n", "\t", "\r", "\x00", "\x1b[31m"]
"""Pieces the shell, ``input text`` or the intent parser could mangle."""


def make_chat_screen(package: str = WHATSAPP, hint: str = "Message") -> str:
    """A conversation screen: a title, an EditText showing its hint, a send button."""
    kids = [
        rt.make_node("android.widget.TextView", package, (160, 110, 620, 210), text="Alice",
                     index=0),
        rt.make_node("android.widget.EditText", package, EDITOR_BOUNDS, text=hint,
                     resource_id=EDITOR, clickable=True, index=1),
        rt.make_node("android.widget.ImageButton", package, (930, 2200, 1050, 2320),
                     resource_id=f"{package}:id/send", content_desc="Send", clickable=True,
                     index=2),
    ]
    root = rt.make_node("android.widget.FrameLayout", package, (0, 0, 1080, 2400), children=kids)
    return rt.make_hierarchy([root])


def publish_chat_screen(state_dir: Path) -> None:
    def put(s: dict[str, Any]) -> None:
        s.setdefault("screens", {})[WHATSAPP] = make_chat_screen()

    rt.update_state(state_dir, put)


class ToolboxLink:
    """A :class:`DeviceLink` that runs command lines in a lab phone's shell on this host."""

    def __init__(self, toolbox: Toolbox) -> None:
        self.toolbox = toolbox
        self.serial = toolbox.config.serial
        self.commands: list[str] = []

    def shell(self, command: str, timeout: float = DEFAULT_TIMEOUT_S) -> ShellResult:
        self.commands.append(command)
        r = subprocess.run(self.toolbox.argv(command), env=self.toolbox.environment(), cwd="/",
                           capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL)
        return ShellResult(command, r.returncode, r.stdout, r.stderr)

    def push(self, local: Path, remote: str, mode: int = 0o644,
             timeout: float = DEFAULT_TIMEOUT_S) -> None:
        raise NotImplementedError

    def pull(self, remote: str, local: Path, timeout: float = DEFAULT_TIMEOUT_S) -> int:
        raise NotImplementedError


def make_lab_phone(root: Path, config: PhoneConfig | None = None) -> ToolboxLink:
    """A lab phone (no adbd) showing WhatsApp's chat with the text field focused."""
    tb = Toolbox(config or samsung_s21(serial="TYPE0001", locale="en-US"), root,
                 use_mount_namespace=False)
    tb.prepare(reset=True)
    publish_chat_screen(tb.state_dir)
    link = ToolboxLink(tb)
    link.shell(f"am start -n {WHATSAPP}/.home.ui.HomeActivity").check(link.serial)
    x, y = (EDITOR_BOUNDS[0] + EDITOR_BOUNDS[2]) // 2, (EDITOR_BOUNDS[1] + EDITOR_BOUNDS[3]) // 2
    link.shell(f"input tap {x} {y}").check(link.serial)
    return link


def field_text(state_dir: Path, package: str = WHATSAPP) -> str | None:
    field = rt.read_state(state_dir).get("text_fields", {}).get(package)
    return None if field is None else str(field["text"])


def clear_field(state_dir: Path) -> None:
    rt.edit_focused(str(state_dir), lambda _old: "")


@pytest.fixture(scope="module")
def lab_link(tmp_path_factory: pytest.TempPathFactory) -> ToolboxLink:
    return make_lab_phone(tmp_path_factory.mktemp("phone"))


# ----------------------------------------------------------------------------- escaping


def test_input_text_args_send_spaces_as_percent_s_and_split_a_literal_percent_s() -> None:
    assert input_text_args("hello world") == ["hello%sworld"]
    assert input_text_args("100% sure") == ["100%%ssure"]
    assert input_text_args("printf %s") == ["printf%s%", "s"]
    assert input_text_args("%s%s") == ["%", "s%", "s"]
    assert input_text_args("a" * 450) == ["a" * 200, "a" * 200, "a" * 50]
    assert input_text_args("") == []
    assert input_text_commands("it's $(id)") == ["input text 'it'\"'\"'s%s$(id)'"]
    with pytest.raises(ValueError):
        input_text_args("città")


@given(st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=300),
       st.integers(min_value=1, max_value=250))
def test_input_text_args_type_exactly_the_text_as_android_decodes_them(text: str,
                                                                        limit: int) -> None:
    args = input_text_args(text, limit)
    assert "".join(rt.decode_input_text(a) for a in args) == text
    assert all(a and len(rt.decode_input_text(a)) <= limit for a in args)
    for cmd, arg in zip(input_text_commands(text), input_text_args(text), strict=True):
        assert shlex.split(cmd) == ["input", "text", arg]


# ----------------------------------------------------------------------------- lab phone


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.one_of(
    st.text(st.characters(codec="utf-8"), max_size=40),
    st.lists(st.sampled_from(HOSTILE), max_size=8).map("".join),
    st.lists(st.one_of(st.sampled_from(HOSTILE),
                       st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E),
                               max_size=5)), max_size=8).map("".join),
))
def test_any_text_arrives_verbatim_in_the_lab_field_and_runs_nothing(lab_link: ToolboxLink,
                                                                     text: str) -> None:
    state_dir = lab_link.toolbox.state_dir
    clear_field(state_dir)
    how = type_text(lab_link, text)
    assert field_text(state_dir) == text, how
    assert not MARKER.exists()
    state = rt.read_state(state_dir)
    assert state["settings"]["secure"]["default_input_method"] == SAMSUNG_IME
    assert ADB_KEYBOARD_IME not in rt.enabled_input_methods(state)


def test_the_lab_field_shows_in_uiautomator_dump_and_send_rules_apply(tmp_path: Path) -> None:
    link = make_lab_phone(tmp_path / "p")
    dump = lambda: parse_screen(link.shell("uiautomator dump /dev/tty").stdout)  # noqa: E731
    node = next(n for n in dump() if n.resource_id == EDITOR)
    assert node.text == "Message"  # the hint, until something is typed
    assert type_text(link, "ciao, città <b>&amp;</b> 👋") == "ADBKeyBoard"
    assert type_text(link, " & 'ok'") == "input text"
    node = next(n for n in dump() if n.resource_id == EDITOR)
    assert node.text == "ciao, città <b>&amp;</b> 👋 & 'ok'"
    assert '<node index="1" text="ciao, città &lt;b&gt;&amp;amp;&lt;/b&gt; 👋 &amp; \'ok\'"' in \
        link.shell("uiautomator dump /dev/tty").stdout
    link.shell("input keyevent KEYCODE_DEL KEYCODE_DEL").check(link.serial)
    assert field_text(link.toolbox.state_dir) == "ciao, città <b>&amp;</b> 👋 & 'o"
    events = [json.loads(x) for x in
              (link.toolbox.state_dir / rt.INPUT_LOG).read_text().splitlines()]
    texts = [(e["args"], e.get("via")) for e in events if e["kind"] == "text"]
    assert texts == [(["ciao, città <b>&amp;</b> 👋"], ADB_KEYBOARD_IME), ([" & 'ok'"], None)]


def test_lab_input_text_is_androids(lab_link: ToolboxLink) -> None:
    clear_field(lab_link.toolbox.state_dir)
    r = lab_link.shell("input text città")
    assert r.returncode == 255
    assert "java.lang.NullPointerException: Attempt to get length of null array" in r.stderr
    assert lab_link.shell("input text 'a%sb' c").ok  # one argument only, %s is a space
    assert field_text(lab_link.toolbox.state_dir) == "a b"


def test_lab_am_broadcast_and_ime_answer_like_android(tmp_path: Path) -> None:
    link = make_lab_phone(tmp_path / "p")
    msg = base64.b64encode("né".encode()).decode()
    r = link.shell(f"am broadcast -a ADB_INPUT_B64 --es msg {msg}")
    assert r.stdout == ("Broadcasting: Intent { act=ADB_INPUT_B64 flg=0x400000 (has extras) }\n"
                        "Broadcast completed: result=0\n")
    assert field_text(link.toolbox.state_dir) == ""  # AdbIME is not the selected keyboard
    assert link.shell("ime list -s").stdout == SAMSUNG_IME + "\n"
    assert link.shell("ime list -a -s").stdout.split() == [ADB_KEYBOARD_IME, SAMSUNG_IME]
    assert link.shell(f"ime enable {ADB_KEYBOARD_IME}").stdout == \
        f"Input method {ADB_KEYBOARD_IME}: now enabled for user #0\n"
    assert link.shell(f"ime set {ADB_KEYBOARD_IME}").stdout == \
        f"Input method {ADB_KEYBOARD_IME} selected for user #0\n"
    assert link.shell("settings get secure default_input_method").stdout == \
        ADB_KEYBOARD_IME + "\n"
    assert "mBoundToMethod=true" in link.shell("dumpsys input_method").stdout
    link.shell(f"am broadcast -a ADB_INPUT_B64 -p com.android.adbkeyboard --es msg {msg}")
    link.shell("am broadcast -a ADB_INPUT_CHARS --eia chars '128568,32,67'")
    link.shell("am broadcast -a ADB_INPUT_TEXT --es msg 'x' -n com.android.adbkeyboard/.AdbIME")
    assert field_text(link.toolbox.state_dir) == "né😸 C"  # a component misses the receiver
    link.shell("am broadcast -a ADB_CLEAR_TEXT").check(link.serial)
    assert field_text(link.toolbox.state_dir) == ""
    bad = link.shell("am broadcast -a ADB_INPUT_B64 --es msg")
    assert bad.returncode == 255
    assert 'IllegalArgumentException: Argument expected after "--es"' in bad.stderr
    unknown = link.shell("ime set com.example/.Nope")
    assert (unknown.returncode, unknown.stderr) == (
        255, "Unknown input method com.example/.Nope cannot be selected for user #0\n")


# ----------------------------------------------------------------------------- failures


def test_a_phone_without_adbkeyboard_is_one_clear_error(tmp_path: Path) -> None:
    cfg = samsung_s21(serial="NOKB0001", locale="en-US").model_copy(update={"adb_keyboard": False})
    link = make_lab_phone(tmp_path / "p", cfg)
    assert type_text(link, "plain ascii") == "input text"
    with pytest.raises(DeviceError) as err:
        type_text(link, "grüß dich")
    assert err.value.message == ("NOKB0001: cannot type non-ASCII or control characters: the "
                                 "ADBKeyBoard keyboard (com.android.adbkeyboard) is not installed")
    assert err.value.hint is not None and "adb -s NOKB0001 install ADBKeyboard.apk" in \
        err.value.hint
    assert field_text(link.toolbox.state_dir) == "plain ascii"


def test_without_a_focused_field_adbkeyboard_times_out_and_the_keyboard_is_restored(
        tmp_path: Path) -> None:
    tb = Toolbox(samsung_s21(serial="NOFOCUS1", locale="en-US"), tmp_path / "p", use_mount_namespace=False)
    tb.prepare(reset=True)
    link = ToolboxLink(tb)
    with pytest.raises(DeviceError, match="did not take the text field within 0.3 s") as err:
        type_with_adb_keyboard(link, "ciao 👋", bind_timeout=0.3, poll=0.05)
    assert err.value.hint == "tap the text field first (a field must have the focus)"
    state = rt.read_state(tb.state_dir)
    assert state["settings"]["secure"]["default_input_method"] == SAMSUNG_IME
    assert rt.enabled_input_methods(state) == [SAMSUNG_IME]


def test_a_refused_switch_and_a_failed_broadcast_are_device_errors_that_restore() -> None:
    ime_lists = {r"^ime list -a -s$": f"{SAMSUNG_IME}\n{ADB_KEYBOARD_IME}\n",
                 r"^ime list -s$": f"{SAMSUNG_IME}\n{ADB_KEYBOARD_IME}\n",
                 r"^pm list packages": "package:com.android.adbkeyboard\n"}
    link = RecordingDeviceLink(serial="MIUI0001")
    for pattern, answer in ime_lists.items():
        link.on(pattern, answer)
    link.on(r"^settings get secure default_input_method$", SAMSUNG_IME + "\n")
    with pytest.raises(DeviceError, match=r"MIUI0001: the phone kept the keyboard .*HoneyBoard"):
        type_text(link, "ñ")
    assert link.commands[-1] == f"ime set {SAMSUNG_IME}"  # restored, ADBKeyBoard stays enabled
    assert not any(c.startswith("am broadcast") for c in link.commands)

    link = RecordingDeviceLink(serial="BRKN0001")
    for pattern, answer in ime_lists.items():
        link.on(pattern, answer)
    link.on(r"^settings get secure default_input_method$", ADB_KEYBOARD_IME + "\n")
    link.on(r"^am broadcast", ShellResult("", 255, "", "\nException occurred while executing "
                                                      "'broadcast':\nSecurityException: nope\n"))
    with pytest.raises(DeviceError, match=r"BRKN0001: am broadcast ADB_INPUT_B64 failed: "
                                          r"SecurityException: nope"):
        type_text(link, "ñ")
    assert not any(c.startswith("ime ") for c in link.commands)  # it was on already: left on


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def vlab() -> Iterator[Any]:
    from tests.vlab_fixture import skip_reason, start_vlab

    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    lab = start_vlab(n_phones=1, clock_offsets=(0.0,))
    try:
        yield lab
    finally:
        lab.close()
        shutil.rmtree(lab.tmp, ignore_errors=True)


E2E_TEXT = "héllo wörld 👋 'x' \"y\" $(id)"


def test_e2e_unicode_and_quotes_arrive_verbatim_through_the_real_adb_server(
        vlab: Any, tmp_path: Path) -> None:
    from controller.device import AdbDeviceLink

    phone = vlab.phones[0]
    publish_chat_screen(phone.state_dir)
    link = AdbDeviceLink(vlab.client, phone.address)
    pwned = "/data/local/tmp/flowtruth-pwned"
    path = tmp_path / "type.yaml"
    path.write_text(
        "app: whatsapp\npackage: com.whatsapp\nactivity: com.whatsapp.home.ui.HomeActivity\n"
        "params: {message: '', ascii: ''}\n"
        "activities:\n  chat:\n    - launch: {}\n"
        f"    - tap: {{resource_id: '{EDITOR}'}}\n"
        "    - type: {text: '{message}'}\n"
        "    - assert: {resource_id: '" + EDITOR + "'}\n"
        "    - type: {text: '{ascii}'}\n", encoding="utf-8")
    sc = load_scenario(path)
    ascii_text = f" '; touch {pwned}; echo' \"$(touch {pwned})\" `touch {pwned}` %s 100%"
    runner = ScenarioRunner(link, sc, retry_delay=0.05)
    runner.run(sc.steps("chat", {"message": E2E_TEXT, "ascii": ascii_text}))
    assert [x["detail"] for x in runner.log if x["step"].startswith("type")] == [
        f"{len(E2E_TEXT)} characters (ADBKeyBoard)", f"{len(ascii_text)} characters (input text)"]
    assert field_text(phone.state_dir) == E2E_TEXT + ascii_text
    node = next(n for n in runner.dump() or [] if n.resource_id == EDITOR)
    assert node.text == E2E_TEXT + ascii_text
    assert link.shell(f"ls {pwned}").returncode != 0  # no command of the text ran
    state = rt.read_state(phone.state_dir)
    assert state["settings"]["secure"]["default_input_method"] == SAMSUNG_IME
    assert ADB_KEYBOARD_IME not in rt.enabled_input_methods(state)
    events = [json.loads(x) for x in (phone.state_dir / rt.INPUT_LOG).read_text().splitlines()]
    assert [e["args"][0] for e in events if e["kind"] == "text" and e.get("via")] == [E2E_TEXT]


@pytest.fixture
def no_keyboard_phone(tmp_path: Path) -> Iterator[Any]:
    adb = shutil.which("adb")
    if adb is None:
        pytest.skip("the Debian adb package is not installed")
    from controller.device import AdbDeviceLink, adb_client, connect
    from controller.lab.adbd import EmulatedAdbd
    from tests.vlab_fixture import free_port

    home = tmp_path / "home"
    home.mkdir()
    port = free_port()
    env = dict(os.environ, HOME=str(home), ANDROID_USER_HOME=str(home / ".android"),
               TMPDIR=str(home))

    def run(*a: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([adb, "-P", str(port), *a], env=env, timeout=30,
                              capture_output=True, text=True, stdin=subprocess.DEVNULL)

    assert run("start-server").returncode == 0
    cfg = samsung_s21(serial="NOKB0002", locale="en-US").model_copy(update={"adb_keyboard": False})
    adbd = EmulatedAdbd(cfg, "127.0.0.1", 0, tmp_path / "phone").start()
    try:
        client = adb_client(port)
        yield AdbDeviceLink(client, connect(client, adbd.address))
    finally:
        run("disconnect", adbd.address)
        adbd.stop()
        run("kill-server")


def test_e2e_a_phone_without_adbkeyboard_names_the_device_and_the_fix(
        no_keyboard_phone: Any) -> None:
    link = no_keyboard_phone
    with pytest.raises(DeviceError) as err:
        type_text(link, E2E_TEXT)
    line = err.value.one_line()
    assert "\n" not in line
    assert line.startswith(f"{link.serial}: cannot type non-ASCII or control characters: the "
                           "ADBKeyBoard keyboard (com.android.adbkeyboard) is not installed "
                           "(install ADBKeyboard.apk (https://github.com/senzhk/ADBKeyBoard")
    assert line.endswith(f"adb -s {link.serial} install ADBKeyboard.apk; or type printable "
                         "ASCII only)")
    assert link.shell("settings get secure default_input_method").stdout.strip() == SAMSUNG_IME
