"""The Android-like toolbox a virtual phone's shell runs: getprop, pm, am, input, ...

This module is imported by the small generated shims in a phone's toolbox directory,
so it uses the standard library only (a shim must start in a few milliseconds).  Every
tool reads or updates the phone's JSON state file, whose path the shell passes in the
``FLOWTRUTH_PHONE_STATE`` environment variable; the lab's simulated apps watch the same
file (``read_state`` / ``update_state`` are their API).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import ctypes
import fcntl
import io
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any, TextIO

STATE_ENV = "FLOWTRUTH_PHONE_STATE"
UID_ENV = "FLOWTRUTH_UID"
STATE_FILE = "state.json"
INPUT_LOG = "input_events.jsonl"
SCHEMA_VERSION = 1

SHELL_ID = (
    "uid=2000(shell) gid=2000(shell) groups=2000(shell),1004(input),1007(log),1011(adb),"
    "1015(sdcard_rw),1028(sdcard_r),1078(ext_data_rw),1079(ext_obb_rw),3001(net_bt_admin),"
    "3002(net_bt),3003(inet),3006(net_bw_stats),3009(readproc),3011(uhid),3012(readtracefs) "
    "context=u:r:shell:s0"
)
ROOT_ID = "uid=0(root) gid=0(root) groups=0(root) context=u:r:magisk:s0"

TOOLS = (
    "getprop",
    "setprop",
    "pm",
    "cmd",
    "am",
    "input",
    "uiautomator",
    "dumpsys",
    "settings",
    "su",
    "id",
    "whoami",
    "pidof",
    "ps",
    "date",
    "wm",
    "monkey",
    "logcat",
    "screencap",
    "getenforce",
    "ime",
)


# --------------------------------------------------------------------------- state file


def state_path(state_dir: str | os.PathLike[str]) -> str:
    """The JSON state file of the phone whose state directory is ``state_dir``."""
    return os.path.join(os.fspath(state_dir), STATE_FILE)


@contextlib.contextmanager
def _locked(state_dir: str, exclusive: bool) -> Iterator[None]:
    with open(os.path.join(state_dir, "state.lock"), "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def read_state(state_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read the phone's state (a consistent snapshot, under a shared lock)."""
    state_dir = os.fspath(state_dir)
    with _locked(state_dir, exclusive=False), open(state_path(state_dir), encoding="utf-8") as f:
        data: dict[str, Any] = json.load(f)
    return data


def write_state(state_dir: str | os.PathLike[str], state: dict[str, Any]) -> None:
    """Replace the phone's state atomically."""
    state_dir = os.fspath(state_dir)
    with _locked(state_dir, exclusive=True):
        _write_unlocked(state_dir, state)


def _write_unlocked(state_dir: str, state: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".state.", dir=state_dir)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(state, f, indent=1, sort_keys=True)
        os.replace(tmp, state_path(state_dir))
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def update_state(state_dir: str | os.PathLike[str], change: Callable[[dict[str, Any]], Any]) -> Any:
    """Apply ``change`` to the state under an exclusive lock and save it; returns its result."""
    state_dir = os.fspath(state_dir)
    with _locked(state_dir, exclusive=True):
        with open(state_path(state_dir), encoding="utf-8") as f:
            state = json.load(f)
        result = change(state)
        _write_unlocked(state_dir, state)
    return result


FAKETIME_ENV = "FLOWTRUTH_FAKETIME"  # "1" when libfaketime shifts this process's clock
_FAKED = os.environ.get(FAKETIME_ENV) == "1"


def device_time(state: dict[str, Any]) -> float:
    """The phone's wall clock: the host's clock plus the phone's offset."""
    if _FAKED:
        return time.time()  # libfaketime already applies the offset in this process
    return time.time() + float(state.get("clock_offset_s", 0.0))


def host_time(state: dict[str, Any]) -> float:
    """The host's (AP's) wall clock, also from inside a faketime-shifted command."""
    if _FAKED:
        return time.time() - float(state.get("clock_offset_s", 0.0))
    return time.time()


def append_input_event(
    state_dir: str, state: dict[str, Any], kind: str, args: list[str], via: str | None = None
) -> None:
    """Append one input event (device and host time) to the phone's input log.

    ``via`` names the input method that committed the text (ADBKeyBoard's broadcasts);
    ``input`` commands leave it out.
    """
    record: dict[str, Any] = {
        "device_time": device_time(state),
        "host_time": host_time(state),
        "kind": kind,
        "args": args,
    }
    if via is not None:
        record["via"] = via
    with _locked(state_dir, exclusive=True):
        with open(os.path.join(state_dir, INPUT_LOG), "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


# --------------------------------------------------------------------------- screens


def _xml_char(c: str) -> str:
    # uiautomator (AccessibilityNodeInfoDumper.stripInvalidXMLChars) writes '.' for the
    # characters XML cannot carry; KXmlSerializer writes tab and line ends as references.
    o = ord(c)
    if c in "\t\n\r":
        return f"&#{o};"
    if (
        o <= 0x8
        or 0xB <= o <= 0xC
        or 0xE <= o <= 0x1F
        or 0x7F <= o <= 0x84
        or 0x86 <= o <= 0x9F
        or 0xFDD0 <= o <= 0xFDDF
        or o in (0xFFFE, 0xFFFF)
        or 0xD800 <= o <= 0xDFFF
    ):
        return "."
    return c


def _attr(value: str) -> str:
    value = (
        value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")
    )
    if value.isascii() and value.isprintable():
        return value
    return "".join(_xml_char(c) if not c.isprintable() or ord(c) >= 0xD800 else c for c in value)


def make_node(
    cls: str,
    package: str,
    bounds: tuple[int, int, int, int],
    *,
    text: str = "",
    resource_id: str = "",
    content_desc: str = "",
    clickable: bool = False,
    focused: bool = False,
    children: list[str] | None = None,
    index: int = 0,
) -> str:
    """One ``<node>`` of a uiautomator hierarchy, with the attributes uiautomator writes."""
    x1, y1, x2, y2 = bounds
    attrs = [
        ("index", str(index)),
        ("text", text),
        ("resource-id", resource_id),
        ("class", cls),
        ("package", package),
        ("content-desc", content_desc),
        ("checkable", "false"),
        ("checked", "false"),
        ("clickable", "true" if clickable else "false"),
        ("enabled", "true"),
        ("focusable", "true" if clickable else "false"),
        ("focused", "true" if focused else "false"),
        ("scrollable", "false"),
        ("long-clickable", "false"),
        ("password", "false"),
        ("selected", "false"),
        ("bounds", f"[{x1},{y1}][{x2},{y2}]"),
    ]
    head = "<node " + " ".join(f'{k}="{_attr(v)}"' for k, v in attrs)
    if not children:
        return head + " />"
    return head + ">" + "".join(children) + "</node>"


def make_hierarchy(nodes: list[str], rotation: int = 0) -> str:
    """A complete uiautomator dump document (one line, as the real tool writes it)."""
    return (
        "<?xml version='1.0' encoding='UTF-8' standalone='yes' ?>"
        f'<hierarchy rotation="{rotation}">' + "".join(nodes) + "</hierarchy>"
    )


def default_screen(state: dict[str, Any], package: str | None) -> str:
    """The screen shown when the simulated app has not published one: its title bar."""
    w = int(state.get("display", {}).get("width", 1080))
    h = int(state.get("display", {}).get("height", 2400))
    pkg = package or "com.android.launcher3"
    label = state.get("packages", {}).get(pkg, {}).get("label") or pkg
    title = make_node(
        "android.widget.TextView",
        pkg,
        (42, 140, w - 42, 230),
        text=label,
        index=0,
        resource_id=f"{pkg}:id/title",
    )
    content = make_node(
        "android.widget.FrameLayout",
        pkg,
        (0, 96, w, h),
        resource_id="android:id/content",
        children=[title],
    )
    root = make_node("android.widget.FrameLayout", pkg, (0, 0, w, h), children=[content])
    return make_hierarchy([root])


# --------------------------------------------------------------------------- tools


class Tool:
    """The context a tool runs in: the state directory, argv and output streams."""

    def __init__(self, state_dir: str, args: list[str], out: TextIO, err: TextIO) -> None:
        self.state_dir = state_dir
        self.args = args
        self.out = out
        self.err = err

    @property
    def is_root(self) -> bool:
        return os.environ.get(UID_ENV, "2000") == "0"

    def state(self) -> dict[str, Any]:
        return read_state(self.state_dir)

    def update(self, change: Callable[[dict[str, Any]], Any]) -> Any:
        return update_state(self.state_dir, change)


def tool_getprop(t: Tool) -> int:
    """``getprop`` lists ``[key]: [value]`` lines; ``getprop KEY [DEFAULT]`` prints one value."""
    props: dict[str, str] = t.state().get("props", {})
    args = [a for a in t.args if not a.startswith("-")]
    if not args:
        for key in sorted(props):
            print(f"[{key}]: [{props[key]}]", file=t.out)
        return 0
    default = args[1] if len(args) > 1 else ""
    print(props.get(args[0], default), file=t.out)
    return 0


def tool_setprop(t: Tool) -> int:
    """``setprop KEY VALUE`` (``ro.*`` only as root)."""
    if len(t.args) != 2:
        print("usage: setprop NAME VALUE", file=t.err)
        return 1
    key, value = t.args
    if key.startswith("ro.") and not t.is_root:
        print(f"Failed to set property '{key}' to '{value}'.", file=t.err)
        return 1

    def change(s: dict[str, Any]) -> None:
        s.setdefault("props", {})[key] = value

    t.update(change)
    return 0


def _apk_path(name: str) -> str:
    return f"/data/app/~~flowtruthLab==/{name}-flowtruth==/base.apk"


def tool_pm(t: Tool) -> int:
    """``pm list packages [-f -3 -s -U --show-versioncode] [FILTER]``, ``pm path``, ``pm clear``."""
    args = list(t.args)
    if not args:
        print("usage: pm [list|path|dump] ...", file=t.err)
        return 1
    packages: dict[str, dict[str, Any]] = t.state().get("packages", {})
    verb = args.pop(0)
    if verb == "list" and args and args[0] == "packages":
        args.pop(0)
        flags = {a for a in args if a.startswith("-")}
        words = [a for a in args if not a.startswith("-")]
        for name in sorted(packages):
            info = packages[name]
            if words and words[0] not in name:
                continue
            if "-3" in flags and info.get("system"):
                continue
            if "-s" in flags and not info.get("system"):
                continue
            line = "package:"
            if "-f" in flags:
                line += _apk_path(name) + "="
            line += name
            if "--show-versioncode" in flags:
                line += f" versionCode:{info.get('version_code', 0)}"
            if "-U" in flags:
                line += f" uid:{info['uid']}"
            print(line, file=t.out)
        return 0
    if verb == "path" and args:
        if args[-1] not in packages:
            return 1
        print("package:" + _apk_path(args[-1]), file=t.out)
        return 0
    if verb in ("clear", "grant", "revoke", "disable-user", "enable") and args:
        if args[-1] not in packages:
            print(f"Error: package {args[-1]} not found", file=t.err)
            return 1
        if verb == "clear":
            print("Success", file=t.out)
        return 0
    print(f"Unknown command: {verb}", file=t.err)
    return 1


def _dumpsys_package(t: Tool, name: str) -> int:
    info = t.state().get("packages", {}).get(name)
    if info is None:
        return 0
    print("Packages:", file=t.out)
    print(f"  Package [{name}] (flowtruth):", file=t.out)
    print(f"    userId={info['uid']}", file=t.out)
    print(f"    codePath={os.path.dirname(_apk_path(name))}", file=t.out)
    print(f"    versionCode={info.get('version_code', 0)} minSdk=24 targetSdk=34", file=t.out)
    print(f"    versionName={info.get('version_name', '')}", file=t.out)
    flags = "SYSTEM HAS_CODE" if info.get("system") else "HAS_CODE ALLOW_CLEAR_USER_DATA"
    print(f"    pkgFlags=[ {flags} ]", file=t.out)
    print("    firstInstallTime=2024-01-01 12:00:00", file=t.out)
    print("    lastUpdateTime=2024-06-01 12:00:00", file=t.out)
    return 0


def _launch_activity(info: dict[str, Any], name: str) -> str:
    return str(info.get("activity") or f"{name}.MainActivity")


def short_component(package: str, cls: str) -> str:
    """``package/.Class`` or ``package/full.Class`` (ComponentName.flattenToShortString)."""
    if cls.startswith(package + "."):
        return f"{package}/{cls[len(package) :]}"
    return f"{package}/{cls}"


def _resolve_component(component: str) -> tuple[str, str]:
    package, _, activity = component.partition("/")
    if activity.startswith("."):
        activity = package + activity
    return package, activity


def tool_am(t: Tool) -> int:
    """``am start [-W] -n PKG/.Activity``, ``am broadcast -a ACTION [--es KEY VALUE ...]``,
    ``am force-stop PKG``."""
    args = list(t.args)
    if not args:
        print("usage: am [start|broadcast|force-stop|kill] ...", file=t.err)
        return 1
    verb = args.pop(0)
    if verb in ("start", "start-activity"):
        return _am_start(t, args)
    if verb == "broadcast":
        return _am_broadcast(t, args)
    if verb in ("force-stop", "kill", "stop-app"):
        if not args:
            print(f"Error: no package specified for {verb}", file=t.err)
            return 1
        package = args[-1]

        def stop(s: dict[str, Any]) -> None:
            s.setdefault("running", {}).pop(package, None)
            fg = s.get("foreground")
            if fg and fg.get("package") == package:
                s["foreground"] = None

        t.update(stop)
        return 0
    print(f"Error: unknown command '{verb}'", file=t.err)
    return 1


def _am_start(t: Tool, args: list[str]) -> int:
    wait = False
    component = None
    intent: dict[str, list[str]] = {"act": [], "cat": [], "dat": [], "typ": []}
    keys = {"-a": "act", "-c": "cat", "-d": "dat", "-t": "typ"}
    i = 0
    while i < len(args):
        a = args[i]
        if a == "-W":
            wait = True
        elif a == "-n" and i + 1 < len(args):
            component = args[i + 1]
            i += 1
        elif a in keys and i + 1 < len(args):
            intent[keys[a]].append(args[i + 1])
            i += 1
        elif a in ("--user", "--display", "--windowingMode", "--activityType", "-f"):
            i += 1
        elif not a.startswith("-") and "/" in a:
            component = a
        i += 1
    if component is None:
        print("Error: Activity not started, no component given (-n pkg/.Activity)", file=t.err)
        return 1
    package, activity = _resolve_component(component)
    return start_activity(t, package, activity, intent, wait)


def start_activity(
    t: Tool, package: str, activity: str, intent: dict[str, list[str]], wait: bool
) -> int:
    """Bring ``package``/``activity`` to the foreground, printing what ``am start`` prints."""
    short = short_component(package, activity)
    parts = [f"act={intent['act'][0]}"] if intent.get("act") else []
    if intent.get("cat"):
        parts.append("cat=[" + ",".join(intent["cat"]) + "]")
    if intent.get("dat"):
        parts.append(f"dat={intent['dat'][0]}")
    if intent.get("typ"):
        parts.append(f"typ={intent['typ'][0]}")
    parts.append(f"cmp={short}")
    print("Starting: Intent { " + " ".join(parts) + " }", file=t.out)
    started = time.monotonic()

    def start(s: dict[str, Any]) -> str:
        if package not in s.get("packages", {}):
            return "missing"
        running = s.setdefault("running", {})
        fg = s.get("foreground") or {}
        if fg.get("package") == package and fg.get("activity") == activity:
            return "top"
        launch = "HOT" if package in running else "COLD"
        if package not in running:
            pid = int(s.get("next_pid", 20000))
            s["next_pid"] = pid + 7
            running[package] = {"pid": pid, "started_at": device_time(s)}
        running[package]["activity"] = activity
        s["foreground"] = {"package": package, "activity": activity, "since": device_time(s)}
        return launch

    outcome = t.update(start)
    if outcome == "missing":
        print("Error type 3", file=t.out)
        print(f"Error: Activity class {{{short}}} does not exist.", file=t.out)
        return 0
    if outcome == "top":
        print(
            "Warning: Activity not started, intent has been delivered to currently running "
            "top-most instance.",
            file=t.out,
        )
    if wait:
        # A cold start of a real messenger takes a few hundred milliseconds.
        if outcome == "COLD":
            time.sleep(0.05)
        total = int((time.monotonic() - started) * 1000) + (380 if outcome == "COLD" else 90)
        print("Status: ok", file=t.out)
        print(f"LaunchState: {outcome if outcome != 'top' else 'UNKNOWN (0)'}", file=t.out)
        print(f"Activity: {short}", file=t.out)
        if outcome != "top":
            print(f"TotalTime: {total}", file=t.out)
        print(f"WaitTime: {total + 4}", file=t.out)
        print("Complete", file=t.out)
    return 0


KEYCODES = {
    "HOME": 3,
    "BACK": 4,
    "CALL": 5,
    "ENDCALL": 6,
    "DPAD_UP": 19,
    "DPAD_DOWN": 20,
    "DPAD_LEFT": 21,
    "DPAD_RIGHT": 22,
    "DPAD_CENTER": 23,
    "VOLUME_UP": 24,
    "VOLUME_DOWN": 25,
    "POWER": 26,
    "CAMERA": 27,
    "TAB": 61,
    "SPACE": 62,
    "ENTER": 66,
    "DEL": 67,
    "MENU": 82,
    "SEARCH": 84,
    "MEDIA_PLAY_PAUSE": 85,
    "VOLUME_MUTE": 164,
    "APP_SWITCH": 187,
    "WAKEUP": 224,
    "SLEEP": 223,
}

_INPUT_SOURCES = {
    "keyboard",
    "mouse",
    "joystick",
    "touchnavigation",
    "touchpad",
    "trackball",
    "stylus",
    "dpad",
    "gesture",
    "touchscreen",
    "gamepad",
    "rotaryencoder",
}

_INPUT_ARITY = {"tap": 2, "swipe": 4, "draganddrop": 4, "press": 0, "roll": 2}


# --------------------------------------------------------------------------- text fields
#
# A tap on an EditText of the foreground app's screen focuses it: ``state["text_fields"]``
# maps a package to its focused field {"resource_id", "bounds", "text"}.  ``input text``
# and the ADBKeyBoard IME's broadcasts type into the foreground app's focused field;
# ``uiautomator dump`` shows the field focused and holding its text.

ADB_KEYBOARD_PACKAGE = "com.android.adbkeyboard"
ADB_KEYBOARD_IME = "com.android.adbkeyboard/.AdbIME"
KEYCODE_DEL = 67
# What KeyCharacterMap.VIRTUAL_KEYBOARD can produce: ``input text`` types nothing else.
_VIRTUAL_KEYBOARD = frozenset(chr(c) for c in range(0x20, 0x7F)) | {"\t", "\n"}


def _node_hit(xml: str, x: float, y: float) -> dict[str, str] | None:
    """The last (topmost) EditText node of a uiautomator document containing (x, y)."""
    import re
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(xml[xml.find("<hierarchy") :])
    except ET.ParseError:
        return None
    hit = None
    for node in root.iter("node"):
        m = re.fullmatch(r"\[(-?\d+),(-?\d+)\]\[(-?\d+),(-?\d+)\]", node.get("bounds", ""))
        if not m or "EditText" not in node.get("class", ""):
            continue
        x1, y1, x2, y2 = (int(v) for v in m.groups())
        if x1 <= x < x2 and y1 <= y < y2:
            hit = {"resource_id": node.get("resource-id", ""), "bounds": node.get("bounds", "")}
    return hit


def focus_at(state_dir: str, x: float, y: float) -> None:
    """A tap at (x, y): focus the EditText there, if any (a tap elsewhere keeps the focus)."""

    def change(s: dict[str, Any]) -> None:
        fg = (s.get("foreground") or {}).get("package")
        if not fg:
            return
        xml = s.get("screens", {}).get(fg) or default_screen(s, fg)
        hit = _node_hit(xml, x, y)
        if hit is None:
            return
        fields = s.setdefault("text_fields", {})
        old = fields.get(fg)
        text = old["text"] if old and old.get("bounds") == hit["bounds"] else ""
        fields[fg] = {**hit, "text": text}

    update_state(state_dir, change)


def edit_focused(state_dir: str, edit: Callable[[str], str]) -> str | None:
    """Apply ``edit`` to the text of the foreground app's focused field; its package or None."""

    def change(s: dict[str, Any]) -> str | None:
        fg = (s.get("foreground") or {}).get("package")
        field = s.get("text_fields", {}).get(fg or "")
        if field is None:
            return None
        field["text"] = edit(str(field.get("text", "")))
        return str(fg)

    result: str | None = update_state(state_dir, change)
    return result


def show_fields(xml: str, field: dict[str, Any]) -> str:
    """A uiautomator document with the focused field marked and showing its text."""
    import xml.etree.ElementTree as ET

    start = xml.find("<hierarchy")
    try:
        root = ET.fromstring(xml[start:])
    except ET.ParseError:
        return xml
    for node in root.iter("node"):
        if "EditText" in node.get("class", "") and node.get("bounds") == field.get("bounds"):
            node.set("focused", "true")
            if field.get("text"):
                node.set("text", field["text"])
            break
    else:
        return xml

    def render(node: ET.Element) -> str:
        head = "<" + node.tag + "".join(f' {k}="{_attr(v)}"' for k, v in node.attrib.items())
        kids = "".join(render(k) for k in node)
        return head + (">" + kids + f"</{node.tag}>" if kids else " />")

    head = "<hierarchy" + "".join(f' {k}="{_attr(v)}"' for k, v in root.attrib.items()) + ">"
    body = "".join(render(k) for k in root)
    return xml[:start] + head + body + "</hierarchy>" + xml[xml.rfind("</hierarchy>") + 12 :]


# --------------------------------------------------------------------------- input methods


def input_methods(state: dict[str, Any]) -> list[str]:
    """Every installed IME's id (``package/.Service``), as ``ime list -a -s`` prints them."""
    return [
        short_component(name, str(info["input_method"]))
        for name, info in sorted(state.get("packages", {}).items())
        if info.get("input_method")
    ]


def enabled_input_methods(state: dict[str, Any]) -> list[str]:
    """The ``enabled_input_methods`` secure setting: ids joined by ':' (subtypes after ';')."""
    raw = state.get("settings", {}).get("secure", {}).get("enabled_input_methods") or ""
    installed = input_methods(state)
    ids = [part.split(";")[0] for part in str(raw).split(":") if part]
    return [i for i in ids if i in installed]


def current_input_method(state: dict[str, Any]) -> str | None:
    """The selected IME (``default_input_method``), if it is installed."""
    ime = state.get("settings", {}).get("secure", {}).get("default_input_method")
    return ime if ime in input_methods(state) else None


def tool_ime(t: Tool) -> int:
    """``ime list [-a] [-s]``, ``ime enable|disable|set ID``, ``ime reset`` (also as
    ``cmd input_method ime``)."""
    args = list(t.args)
    verb = args.pop(0) if args else "help"
    while args[:1] in (["--user"], ["-u"]):  # only user 0 here
        args = args[2:]
    state = t.state()
    installed = input_methods(state)
    if verb == "list":
        ids = installed if "-a" in args else enabled_input_methods(state)
        for ime in ids:
            if "-s" in args:
                print(ime, file=t.out)
            else:
                package = ime.partition("/")[0]
                print(f"{ime}:", file=t.out)
                print(f"  mId={ime} mSettingsActivityName=null", file=t.out)
                print("  mIsDefaultResId=0x0", file=t.out)
                print("  Service:", file=t.out)
                print("    ServiceInfo:", file=t.out)
                print(f"      name={_resolve_component(ime)[1]}", file=t.out)
                print(f"      packageName={package}", file=t.out)
                print("      enabled=true exported=true directBootAware=false", file=t.out)
        return 0
    if verb in ("enable", "disable", "set") and args:
        ime = args[0]
        if ime not in installed:
            what = "selected" if verb == "set" else "enabled" if verb == "enable" else "disabled"
            print(f"Unknown input method {ime} cannot be {what} for user #0", file=t.err)
            return 255

        def change(s: dict[str, Any]) -> bool:
            secure = s.setdefault("settings", {}).setdefault("secure", {})
            enabled = enabled_input_methods(s)
            before = ime in enabled
            if verb == "enable" and not before:
                enabled.append(ime)
            elif verb == "disable" and before:
                enabled.remove(ime)
                if secure.get("default_input_method") == ime:  # IMMS falls back to another
                    secure["default_input_method"] = enabled[0] if enabled else ""
            elif verb == "set":
                secure["default_input_method"] = ime
            secure["enabled_input_methods"] = ":".join(enabled)
            return before

        before = t.update(change)
        if verb == "set":
            print(f"Input method {ime} selected for user #0", file=t.out)
        else:
            done = "enabled" if verb == "enable" else "disabled"
            again = before == (verb == "enable")
            print(
                f"Input method {ime}: {'already' if again else 'now'} {done} for user #0",
                file=t.out,
            )
        return 0
    if verb == "reset":

        def reset(s: dict[str, Any]) -> str:
            secure = s.setdefault("settings", {}).setdefault("secure", {})
            system = [
                short_component(n, str(i["input_method"]))
                for n, i in sorted(s.get("packages", {}).items())
                if i.get("input_method") and i.get("system")
            ]
            secure["enabled_input_methods"] = ":".join(system)
            secure["default_input_method"] = system[0] if system else ""
            return secure["default_input_method"]

        selected = t.update(reset)
        print("Reset current and enabled IMEs for user #0", file=t.out)
        print(f"  Selected: {selected}", file=t.out)
        for ime in enabled_input_methods(t.state()):
            print(f"   Enabled: {ime}", file=t.out)
        return 0
    if verb in ("help", "-h", ""):
        print("ime <command>:", file=t.out)
        print("  list [-a] [-s]", file=t.out)
        print("  enable [--user <USER_ID>] <ID>", file=t.out)
        print("  disable [--user <USER_ID>] <ID>", file=t.out)
        print("  set [--user <USER_ID>] <ID>", file=t.out)
        print("  reset [--user <USER_ID>]", file=t.out)
        return 0
    if verb in ("enable", "disable", "set"):
        print('Error: Argument expected after "' + verb + '"', file=t.err)
        return 255
    print(f"Unknown command: {verb}", file=t.out)
    return 255


# --------------------------------------------------------------------------- broadcasts

_EXTRA_TYPES = {
    "-e": "string", "--es": "string", "--ez": "bool", "--ei": "int", "--el": "long",
    "--ef": "float", "--ed": "double", "--eu": "uri", "--ecn": "component",
    "--eia": "int[]", "--eial": "int[]", "--ela": "long[]", "--elal": "long[]",
    "--efa": "float[]", "--efal": "float[]", "--eda": "double[]", "--edal": "double[]",
    "--esa": "string[]", "--esal": "string[]",
}  # fmt: skip
_INTENT_VALUE = {
    "-a": "act",
    "-d": "dat",
    "-t": "typ",
    "-i": "id",
    "-c": "cat",
    "-n": "cmp",
    "-p": "pkg",
    "-f": "flg",
    "--user": "user",
    "--receiver-permission": "perm",
}
_INTENT_FLAGS = {"--grant-read-uri-permission", "--grant-write-uri-permission",
                 "--exclude-stopped-packages", "--include-stopped-packages",
                 "--receiver-registered-only", "--receiver-replace-pending",
                 "--receiver-foreground", "--receiver-no-abort", "--receiver-include-background",
                 "--allow-background-activity-starts", "--async", "--debug-log-resolution",
                 "--activity-brought-to-front", "--activity-clear-top", "--activity-new-task",
                 "--activity-single-top"}  # fmt: skip
FLAG_RECEIVER_FROM_SHELL = 0x00400000
FLAG_RECEIVER_FOREGROUND = 0x10000000


class IntentError(ValueError):
    """``am`` could not parse its intent arguments (Intent.parseCommandArgs throws)."""


def parse_intent(args: list[str]) -> tuple[dict[str, Any], dict[str, tuple[str, Any]]]:
    """``am`` intent arguments -> (intent fields, extras as key -> (type, value))."""
    intent: dict[str, Any] = {"cat": [], "flg": 0, "opts": set()}
    extras: dict[str, tuple[str, Any]] = {}
    i = 0

    def need(n: int) -> list[str]:
        if i + n >= len(args):
            raise IntentError(f'Argument expected after "{args[i]}"')
        return args[i + 1 : i + 1 + n]

    while i < len(args):
        a = args[i]
        if a in _EXTRA_TYPES:
            key, raw = need(2)
            kind = _EXTRA_TYPES[a]
            extras[key] = (kind, _extra_value(kind, raw))
            i += 3
        elif a == "--esn":
            extras[need(1)[0]] = ("string", None)
            i += 2
        elif a in _INTENT_VALUE:
            (value,) = need(1)
            field = _INTENT_VALUE[a]
            if field == "cat":
                intent["cat"].append(value)
            elif field == "flg":
                intent["flg"] |= int(value, 0)
            else:
                intent[field] = value
            i += 2
        elif a in _INTENT_FLAGS:
            intent["opts"].add(a)
            i += 1
        elif a.startswith("-"):
            raise IntentError(f"Unknown option: {a}")
        elif "cmp" not in intent and "/" in a:
            intent["cmp"] = a
            i += 1
        else:
            intent.setdefault("dat", a)
            i += 1
    return intent, extras


def _extra_value(kind: str, raw: str) -> Any:
    import re

    if kind.endswith("[]"):
        parts = re.split(r"(?<!\\),", raw) if kind == "string[]" else raw.split(",")
        return [_extra_value(kind[:-2], p.replace("\\,", ",")) for p in parts]
    try:
        if kind in ("int", "long"):
            return int(raw)
        if kind in ("float", "double"):
            return float(raw)
    except ValueError:
        raise IntentError(f'For input string: "{raw}"') from None
    if kind == "bool":  # Intent.parseCommandArgs: true/t, false/f, else a number
        if raw.lower() in ("true", "t", "false", "f"):
            return raw.lower() in ("true", "t")
        try:
            return int(raw, 0) != 0
        except ValueError:
            raise IntentError(f'For input string: "{raw}"') from None
    return raw


def describe_intent(intent: dict[str, Any], extras: dict[str, Any], flags: int) -> str:
    """``Intent { act=... flg=0x... (has extras) }`` as Intent.toString() writes it."""
    parts = []
    if intent.get("act"):
        parts.append(f"act={intent['act']}")
    if intent["cat"]:
        parts.append("cat=[" + ",".join(intent["cat"]) + "]")
    if intent.get("dat"):
        parts.append(f"dat={intent['dat']}")
    if intent.get("typ"):
        parts.append(f"typ={intent['typ']}")
    if flags:
        parts.append(f"flg={flags:#x}")
    if intent.get("pkg"):
        parts.append(f"pkg={intent['pkg']}")
    if intent.get("cmp"):
        parts.append("cmp=" + short_component(*_resolve_component(intent["cmp"])))
    if extras:
        parts.append("(has extras)")
    return "Intent { " + " ".join(parts) + " }"


def _am_broadcast(t: Tool, args: list[str]) -> int:
    try:
        intent, extras = parse_intent(args)
    except IntentError as exc:
        print("", file=t.err)
        print("Exception occurred while executing 'broadcast':", file=t.err)
        print(f"java.lang.IllegalArgumentException: {exc}", file=t.err)
        print("\tat android.content.Intent.parseCommandArgs(Intent.java:11812)", file=t.err)
        return 255
    flags = intent["flg"] | FLAG_RECEIVER_FROM_SHELL
    if "--receiver-foreground" in intent["opts"]:
        flags |= FLAG_RECEIVER_FOREGROUND
    print("Broadcasting: " + describe_intent(intent, extras, flags), file=t.out)
    t.out.flush()
    deliver_broadcast(t.state_dir, intent, extras)
    print("Broadcast completed: result=0", file=t.out)
    return 0


def deliver_broadcast(
    state_dir: str, intent: dict[str, Any], extras: dict[str, tuple[str, Any]]
) -> None:
    """Hand a broadcast to the receivers that want it: ADBKeyBoard's, while it is the IME.

    AdbIME registers its receiver when the input method service starts, so its actions
    do nothing unless it is the selected IME; it types into the focused field only.
    """
    if intent.get("cmp") or intent.get("pkg") not in (None, ADB_KEYBOARD_PACKAGE):
        return  # AdbIME's receiver is registered at run time: a component cannot name it
    state = read_state(state_dir)
    if current_input_method(state) != ADB_KEYBOARD_IME:
        return
    action = intent.get("act")

    def string(key: str) -> str | None:
        kind, value = extras.get(key, ("", None))
        return value if kind == "string" else None

    text: str | None = None
    if action == "ADB_INPUT_TEXT":
        text = string("msg")
    elif action == "ADB_INPUT_B64":
        data = string("msg")
        if data is None:
            return
        try:  # android.util.Base64.DEFAULT skips line breaks and spaces
            raw = base64.b64decode("".join(data.split()), validate=True)
        except (binascii.Error, ValueError):
            return
        text = raw.decode("utf-8", errors="replace")
    elif action == "ADB_INPUT_CHARS":
        kind, chars = extras.get("chars", ("", None))
        if kind == "int[]" and chars is not None:
            try:
                text = "".join(chr(c) for c in chars)
            except (ValueError, OverflowError):
                return
    elif action == "ADB_INPUT_CODE":
        kind, code = extras.get("code", ("", -1))
        if kind == "int" and code == KEYCODE_DEL:
            edit_focused(state_dir, lambda old: old[:-1])
        return
    elif action == "ADB_CLEAR_TEXT":
        edit_focused(state_dir, lambda old: "")
        return
    if text is None:
        return
    typed = text
    if edit_focused(state_dir, lambda old: old + typed) is not None:
        append_input_event(state_dir, read_state(state_dir), "text", [text], via=ADB_KEYBOARD_IME)


def decode_input_text(arg: str) -> str:
    """What ``input text ARG`` types: InputShellCommand.sendText turns each ``%s`` into a
    space (there is no escape for a literal ``%s``); everything else is typed as is."""
    out: list[str] = []
    escape = False
    for c in arg:
        if escape and c == "s":
            out[-1] = " "
            escape = False
            continue
        escape = c == "%"
        out.append(c)
    return "".join(out)


def tool_input(t: Tool) -> int:
    """``input [SOURCE] tap|swipe|text|keyevent|...``: appended to the phone's input log."""
    args = list(t.args)
    if args and args[0] in _INPUT_SOURCES:
        args.pop(0)
    if args[:1] == ["-d"] and len(args) > 1:
        args = args[2:]
    if not args:
        print("Usage: input [<source>] [-d DISPLAY_ID] <command> [<arg>...]", file=t.err)
        return 1
    kind, rest = args[0], args[1:]
    if kind in _INPUT_ARITY:
        need = _INPUT_ARITY[kind]
        try:
            [float(x) for x in rest[: need + 1]]
        except ValueError:
            print(f"Error: Invalid arguments for command: {kind}", file=t.err)
            return 1
        if len(rest) < need:
            print(f"Error: Invalid arguments for command: {kind}", file=t.err)
            return 1
    elif kind == "text":
        if not rest:
            print('Error: Argument expected after "text"', file=t.err)
            return 255
        text = decode_input_text(rest[0])  # InputShellCommand reads one argument
        bad = next((c for c in text if c not in _VIRTUAL_KEYBOARD), None)
        if bad is not None:  # KeyCharacterMap.getEvents() answers null
            print("", file=t.err)
            print("Exception occurred while executing 'text':", file=t.err)
            print("java.lang.NullPointerException: Attempt to get length of null array", file=t.err)
            print(
                "\tat com.android.server.input.InputShellCommand.sendText"
                "(InputShellCommand.java:228)",
                file=t.err,
            )
            return 255
        rest = [text]
    elif kind in ("keyevent", "keycombination"):
        codes = [a for a in rest if not a.startswith("--")]
        if not codes:
            print(f"Error: Invalid arguments for command: {kind}", file=t.err)
            return 1
        resolved: list[str] = []
        for c in codes:
            name = c.upper().removeprefix("KEYCODE_")
            if c.isdigit():
                resolved.append(c)
            elif name in KEYCODES:
                resolved.append(f"KEYCODE_{name}")
            else:
                print(f"Error: Invalid arguments for command: {kind}", file=t.err)
                return 1
        rest = resolved
    else:
        print(f"Error: Unknown command: {kind}", file=t.err)
        return 1
    append_input_event(t.state_dir, t.state(), kind, rest)
    if kind == "tap":
        focus_at(t.state_dir, float(rest[0]), float(rest[1]))
    elif kind == "text":
        typed = rest[0]
        edit_focused(t.state_dir, lambda old: old + typed)
    elif kind == "keyevent":
        dels = sum(c in ("KEYCODE_DEL", str(KEYCODE_DEL)) for c in rest)
        if dels:
            edit_focused(t.state_dir, lambda old: old[: max(0, len(old) - dels)])
    if kind == "keyevent" and rest[-1] in ("KEYCODE_HOME", "3"):

        def go_home(s: dict[str, Any]) -> None:
            s["foreground"] = None  # the launcher; the app keeps running in the background

        t.update(go_home)
    return 0


def _map_device_path(state_dir: str, path: str) -> str:
    """Map /sdcard and /data paths into the phone's file tree when no mount namespace is used."""
    if os.environ.get("FLOWTRUTH_MOUNTNS") == "1":
        return path
    from_root = os.path.normpath(path)
    for prefix, target in (
        ("/sdcard", "fs/storage/emulated/0"),
        ("/storage", "fs/storage"),
        ("/data", "fs/data"),
    ):
        if from_root == prefix or from_root.startswith(prefix + "/"):
            return os.path.join(state_dir, target) + from_root[len(prefix) :]
    return path


def tool_uiautomator(t: Tool) -> int:
    """``uiautomator dump [FILE]``: the foreground app's screen as uiautomator XML."""
    args = list(t.args)
    if not args or args[0] != "dump":
        print("Usage: uiautomator <subcommand> [options]", file=t.err)
        print("Available subcommands: dump, events, runtest", file=t.err)
        return 1
    targets = [a for a in args[1:] if not a.startswith("--")]
    target = targets[0] if targets else "/sdcard/window_dump.xml"
    state = t.state()
    fg = (state.get("foreground") or {}).get("package")
    xml = state.get("screens", {}).get(fg or "") or default_screen(state, fg)
    field = state.get("text_fields", {}).get(fg or "")
    if field:
        xml = show_fields(xml, field)
    if target in ("/dev/tty", "/dev/stdout"):
        t.out.write(xml)
        t.out.write("\nUI hierchary dumped to: " + target + "\n")
        return 0
    real = _map_device_path(t.state_dir, target)
    try:
        os.makedirs(os.path.dirname(real) or ".", exist_ok=True)
        with open(real, "w", encoding="utf-8") as f:
            f.write(xml)
    except OSError as exc:
        print(f"ERROR: could not write {target}: {exc.strerror}", file=t.err)
        return 1
    print(f"UI hierchary dumped to: {target}", file=t.out)
    return 0


def tool_dumpsys(t: Tool) -> int:
    """``dumpsys battery|package PKG|window|activity top|activities|input_method|power``."""
    args = list(t.args)
    service = args[0] if args else ""
    state = t.state()
    if service == "battery":
        b = state.get("battery", {})
        level = int(b.get("level", 80))
        lines = [
            "Current Battery Service state:",
            f"  AC powered: {str(b.get('ac_powered', False)).lower()}",
            f"  USB powered: {str(b.get('usb_powered', True)).lower()}",
            f"  Wireless powered: {str(b.get('wireless_powered', False)).lower()}",
            "  Dock powered: false",
            "  Max charging current: 500000",
            "  Max charging voltage: 5000000",
            f"  Charge counter: {level * 38000}",
            f"  status: {int(b.get('status', 2))}",
            "  health: 2",
            "  present: true",
            f"  level: {level}",
            "  scale: 100",
            f"  voltage: {int(b.get('voltage_mv', 4123))}",
            f"  temperature: {int(b.get('temperature_dc', 285))}",
            "  technology: Li-ion",
        ]
        if state.get("props", {}).get("ro.product.manufacturer") == "samsung":
            # Samsung's BatteryService, as a real S-series prints it (no Dock line, its own
            # keys, two unindented trailer lines)
            lines = [x for x in lines if "Dock powered" not in x] + [
                "  batterySWSelfDischarging: false",
                "  batteryMiscEvent: 65536",
                "  batteryCurrentEvent: 0",
                f"  mSecPlugTypeSummary: {2 if b.get('usb_powered', True) else 0}",
                "  LED Charging: true",
                "  LED Low Battery: true",
                "  current now: 0",
                f"  charge counter: {level * 38000}",
                "  Adaptive Fast Charging Settings: true",
                "USE_FAKE_BATTERY: false",
                "SEC_FEATURE_BATTERY_SIMULATION: false",
            ]
        print("\n".join(lines), file=t.out)
        return 0
    if service == "package" and len(args) > 1:
        return _dumpsys_package(t, args[1])
    if service == "window":
        fg = state.get("foreground")
        if fg:
            comp = short_component(fg["package"], fg["activity"])
            print(f"  mCurrentFocus=Window{{8c1f2a u0 {comp}}}", file=t.out)
            print(f"  mFocusedApp=ActivityRecord{{5d3e8b u0 {comp} t42}}", file=t.out)
        else:
            print("  mCurrentFocus=null", file=t.out)
        return 0
    if service == "activity" and args[1:2] == ["top"]:
        for pkg, info in sorted(state.get("running", {}).items()):
            comp = short_component(pkg, info.get("activity", pkg + ".MainActivity"))
            print(f"TASK {pkg} id=42 userId=0", file=t.out)
            print(f"  ACTIVITY {comp} 7c2d1e pid={info['pid']}", file=t.out)
        return 0
    if service == "activity" and args[1:2] == ["activities"]:
        fg = state.get("foreground")
        if fg:
            comp = short_component(fg["package"], fg["activity"])
            print(f"  mResumedActivity: ActivityRecord{{5d3e8b u0 {comp} t42}}", file=t.out)
        return 0
    if service == "input_method":
        # AdbIME binds (and registers its broadcast receiver) once a field has the focus.
        ime = current_input_method(state)
        fg = (state.get("foreground") or {}).get("package")
        bound = ime is not None and fg in state.get("text_fields", {})
        print("INPUT MANAGER (dumpsys input_method)", file=t.out)
        print(f"  mCurMethodId={ime}", file=t.out)
        print(
            f"  mCurId={ime if bound else None} mHaveConnection={str(ime is not None).lower()} "
            f"mBoundToMethod={str(bound).lower()} mVisibleBound=false",
            file=t.out,
        )
        return 0
    if service == "power":
        print("  mWakefulness=Awake", file=t.out)
        print("  Display Power: state=ON", file=t.out)
        return 0
    if service == "":
        print("Currently running services:", file=t.out)
        for name in ("activity", "battery", "package", "power", "window"):
            print(f"  {name}", file=t.out)
        return 0
    print(f"Can't find service: {service}", file=t.err)
    return 0


def tool_settings(t: Tool) -> int:
    """``settings get|put|delete|list global|secure|system [KEY [VALUE]]``."""
    args = [a for a in t.args if a not in ("--user", "current", "0")]
    if len(args) < 2 or args[1] not in ("global", "secure", "system"):
        print("usage:  settings [--user <USER_ID> | current] get namespace key", file=t.err)
        return 1
    verb, namespace = args[0], args[1]
    if verb == "get" and len(args) == 3:
        value = t.state().get("settings", {}).get(namespace, {}).get(args[2])
        print("null" if value is None else value, file=t.out)
        return 0
    if verb == "put" and len(args) >= 4:
        key, value = args[2], args[3]

        def put(s: dict[str, Any]) -> None:
            s.setdefault("settings", {}).setdefault(namespace, {})[key] = value

        t.update(put)
        return 0
    if verb == "delete" and len(args) == 3:

        def delete(s: dict[str, Any]) -> None:
            s.setdefault("settings", {}).setdefault(namespace, {}).pop(args[2], None)

        t.update(delete)
        return 0
    if verb == "list" and len(args) == 2:
        values = t.state().get("settings", {}).get(namespace, {})
        for key in sorted(values):
            print(f"{key}={values[key]}", file=t.out)
        return 0
    print("usage:  settings [--user <USER_ID> | current] get namespace key", file=t.err)
    return 1


def tool_id(t: Tool) -> int:
    """``id``: the shell's identity, or root's under ``su``."""
    print(ROOT_ID if t.is_root else SHELL_ID, file=t.out)
    return 0


def tool_whoami(t: Tool) -> int:
    """``whoami``: shell, or root under ``su``."""
    print("root" if t.is_root else "shell", file=t.out)
    return 0


def _netns_of(pid: str) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/net")
    except OSError:
        return None


def tool_pidof(t: Tool) -> int:
    """``pidof NAME...``: simulated apps' pids plus real processes in this network namespace."""
    names = [a for a in t.args if not a.startswith("-")]
    if not names:
        return 1
    pids: list[int] = []
    running = t.state().get("running", {})
    for name in names:
        if name in running:
            pids.append(int(running[name]["pid"]))
    own_ns = _netns_of("self")
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in pids:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv0 = f.read().split(b"\0", 1)[0].decode(errors="replace")
            with open(f"/proc/{entry}/comm", encoding="utf-8", errors="replace") as f:
                comm = f.read().strip()
        except OSError:
            continue
        if any(n in (comm, argv0, os.path.basename(argv0)) for n in names):
            if _netns_of(entry) == own_ns and int(entry) != os.getpid():
                pids.append(int(entry))
    if not pids:
        return 1
    print(" ".join(str(p) for p in sorted(set(pids), reverse=True)), file=t.out)
    return 0


def android_user(uid: int) -> str:
    """Android's name of a uid as ps prints it: root, system, shell, u0_a<N>, u0_i<N>."""
    named = {0: "root", 1000: "system", 1001: "radio", 1010: "wifi", 1013: "media",
             1041: "audioserver", 2000: "shell", 9999: "nobody"}
    user, app = divmod(uid, 100000)
    if app in named and user == 0:
        return named[app]
    if 10000 <= app < 20000:
        return f"u{user}_a{app - 10000}"
    if 99000 <= app < 100000:  # AID_ISOLATED_START
        return f"u{user}_i{app - 99000}"
    return str(uid)


PS_FORMAT = "{:<9} {:>8} {:>5} {:>7} {:>6} {:<16} {:>4} {} {}"


def tool_ps(t: Tool) -> int:
    """toybox ``ps -A``: ``USER PID PPID VSZ RSS WCHAN ADDR S NAME`` of the processes in this
    phone's network namespace (NAME: argv[0], or [comm] for a process without one)."""
    own_ns = _netns_of("self")
    rows = []
    for entry in sorted((e for e in os.listdir("/proc") if e.isdigit()), key=int):
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8", errors="replace") as f:
                stat = f.read()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv0 = f.read().split(b"\0", 1)[0].decode(errors="replace")
            uid = os.stat(f"/proc/{entry}").st_uid
        except OSError:
            continue
        if _netns_of(entry) != own_ns:
            continue
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        try:
            with open(f"/proc/{entry}/wchan", encoding="utf-8", errors="replace") as f:
                wchan = f.read().strip() or "0"
        except OSError:
            wchan = "0"
        name = argv0.replace("\n", "?") if argv0 else f"[{comm}]"
        rows.append(PS_FORMAT.format(android_user(uid), entry, fields[1],
                                     int(fields[20]) // 1024, int(fields[21]) * 4,
                                     wchan[:16], 0, fields[0], name))
    print(PS_FORMAT.format("USER", "PID", "PPID", "VSZ", "RSS", "WCHAN", "ADDR", "S", "NAME"),
          file=t.out)
    for r in rows:
        print(r, file=t.out)
    return 0


def tool_date(t: Tool) -> int:
    """``date``: the host's clock plus the phone's offset (``date +%s.%N`` and friends)."""
    args = list(t.args)
    if any(
        a in ("-d", "--date", "-r", "--reference") or a.startswith(("--date=", "-d")) for a in args
    ):
        return subprocess.call(["/bin/date", *args])
    if any(a in ("-s", "--set") or a.startswith("--set=") for a in args):
        print("date: cannot set date: Operation not permitted", file=t.err)
        return 1
    now = device_time(t.state())
    t.out.flush()
    return subprocess.call(["/bin/date", "-d", f"@{now:.9f}", *args])


def tool_wm(t: Tool) -> int:
    """``wm size``, ``wm density``."""
    display = t.state().get("display", {})
    if t.args[:1] == ["size"]:
        print(
            f"Physical size: {display.get('width', 1080)}x{display.get('height', 2400)}", file=t.out
        )
        return 0
    if t.args[:1] == ["density"]:
        print(f"Physical density: {display.get('density', 420)}", file=t.out)
        return 0
    print("usage: wm [size|density]", file=t.err)
    return 1


def tool_monkey(t: Tool) -> int:
    """``monkey -p PKG -c android.intent.category.LAUNCHER 1``: launch an app (as adbutils does)."""
    args = list(t.args)
    package = args[args.index("-p") + 1] if "-p" in args[:-1] else None
    info = t.state().get("packages", {}).get(package or "")
    if package is None or info is None or not info.get("activity"):
        print("** No activities found to run, monkey aborted.", file=t.err)
        return 252
    started = time.monotonic()
    quiet = io.StringIO()
    status = start_activity(
        Tool(t.state_dir, [], quiet, t.err),
        package,
        info["activity"],
        {"act": ["android.intent.action.MAIN"], "cat": ["android.intent.category.LAUNCHER"]},
        wait=False,
    )
    elapsed = int((time.monotonic() - started) * 1000) + 40
    print("Events injected: 1", file=t.out)
    print(
        f"## Network stats: elapsed time={elapsed}ms (0ms mobile, 0ms wifi, "
        f"{elapsed}ms not connected)",
        file=t.out,
    )
    return status


LOGCAT_FILE = "logcat.txt"


def tool_logcat(t: Tool) -> int:
    """``logcat [-d] [-c]``: the phone's log (simulated apps append lines to logcat.txt)."""
    path = os.path.join(t.state_dir, LOGCAT_FILE)
    if "-c" in t.args or "--clear" in t.args:
        open(path, "w").close()
        return 0
    with open(path, "a+", encoding="utf-8", errors="replace") as f:
        f.seek(0)
        t.out.write(f.read())
        t.out.flush()
        if "-d" in t.args:
            return 0
        while True:  # follow, as logcat does, until adbd kills us with the stream
            line = f.readline()
            if line:
                t.out.write(line)
                t.out.flush()
            else:
                time.sleep(0.2)


def _png(width: int, height: int, rgb: tuple[int, int, int]) -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    row = b"\0" + bytes(rgb) * width
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(row * height, 6))
        + chunk(b"IEND", b"")
    )


def tool_screencap(t: Tool) -> int:
    """``screencap -p [FILE]``: a PNG of the (plain) screen."""
    display = t.state().get("display", {})
    png = _png(int(display.get("width", 1080)), int(display.get("height", 2400)), (18, 18, 24))
    files = [a for a in t.args if not a.startswith("-")]
    if files:
        with open(_map_device_path(t.state_dir, files[0]), "wb") as f:
            f.write(png)
        return 0
    t.out.flush()
    sys.stdout.buffer.write(png)
    sys.stdout.buffer.flush()
    return 0


def tool_getenforce(t: Tool) -> int:
    """``getenforce``: SELinux is enforcing, as on a retail phone."""
    print("Enforcing", file=t.out)
    return 0


def tool_cmd(t: Tool) -> int:
    """``cmd package|activity|settings|input|input_method ...``: the same tools under their
    service names."""
    args = list(t.args)
    if not args:
        print("cmd: No service specified; use -l to list all running services.", file=t.err)
        return 20
    service, t.args = args[0], args[1:]
    if service == "package":
        return tool_pm(t)
    if service == "activity":
        return tool_am(t)
    if service == "settings":
        return tool_settings(t)
    if service == "input":
        return tool_input(t)
    if service == "input_method" and t.args[:1] == ["ime"]:
        t.args = t.args[1:]
        return tool_ime(t)
    print(f"cmd: Can't find service: {service}", file=t.err)
    return 20


# --------------------------------------------------------------------------- tracer faults

AUDIT_ARCH_X86_64 = 0xC000003E
AUDIT_ARCH_AARCH64 = 0xC00000B7
_NR = {  # (wait4, ptrace) per architecture
    AUDIT_ARCH_X86_64: (61, 101),
    AUDIT_ARCH_AARCH64: (260, 117),
}
__WALL = 0x40000000
PTRACE_ATTACH, PTRACE_SEIZE = 16, 0x4206
EACCES, EPERM = 13, 1


def _bpf(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("<HBBI", code, jt, jf, k)


def tracing_filter(fault: str, arch: int) -> bytes:
    """A seccomp BPF program for this process tree: ``selinux`` fails ``wait4(..., __WALL)``
    with EACCES (what SELinux's denial of sigchld does to strace on a Samsung, Magisk issue
    596); ``ptrace`` fails PTRACE_SEIZE/PTRACE_ATTACH with EPERM (a vendor's ptrace block).
    Every other call is allowed; shells never wait with __WALL."""
    ld_w_abs, jeq_k, jset_k, ret_k = 0x20, 0x15, 0x45, 0x06
    wait4, ptrace = _NR[arch]
    allow = _bpf(ret_k, 0x7FFF0000)
    if fault == "selinux":
        errno = 0x00050000 | EACCES
        prog = [_bpf(ld_w_abs, 4), _bpf(jeq_k, arch, 0, 5),
                _bpf(ld_w_abs, 0), _bpf(jeq_k, wait4, 0, 3),
                _bpf(ld_w_abs, 16 + 8 * 2), _bpf(jset_k, __WALL, 0, 1),
                _bpf(ret_k, errno), allow]
    elif fault == "ptrace":
        errno = 0x00050000 | EPERM
        prog = [_bpf(ld_w_abs, 4), _bpf(jeq_k, arch, 0, 6),
                _bpf(ld_w_abs, 0), _bpf(jeq_k, ptrace, 0, 4),
                _bpf(ld_w_abs, 16), _bpf(jeq_k, PTRACE_SEIZE, 1, 0),
                _bpf(jeq_k, PTRACE_ATTACH, 0, 1), _bpf(ret_k, errno), allow]
    else:
        raise ValueError(f"unknown strace fault {fault!r}")
    return b"".join(prog)


def deny_tracing(fault: str) -> None:
    """Install :func:`tracing_filter` on this process (inherited by everything it starts):
    real kernel errors for a lab phone whose strace must fail as on real phones."""
    import platform

    arch = {"x86_64": AUDIT_ARCH_X86_64, "aarch64": AUDIT_ARCH_AARCH64}.get(platform.machine())
    if arch is None:
        raise OSError(f"strace faults are not available on {platform.machine()}")
    prog = tracing_filter(fault, arch)
    buf = ctypes.create_string_buffer(prog, len(prog))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = SockFprog(len(prog) // 8, ctypes.cast(buf, ctypes.c_void_p))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong,
                           ctypes.c_ulong]
    if libc.prctl(38, 1, None, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    if libc.prctl(22, 2, ctypes.byref(fprog), 0, 0) != 0:  # PR_SET_SECCOMP, MODE_FILTER
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP)")


def tool_su(t: Tool) -> int:
    """Magisk-style ``su``: ``su -c CMD``, ``su 0 CMD...``, or a root shell reading stdin."""
    args = list(t.args)
    command: str | None = None
    shell = "/bin/sh"
    rest: list[str] = []
    while args:
        a = args.pop(0)
        if a in ("-c", "--command") and args:
            command = args.pop(0)
        elif a.startswith("--command="):
            command = a.split("=", 1)[1]
        elif a in ("-s", "--shell") and args:
            shell = args.pop(0)
        elif a in (
            "-",
            "-l",
            "--login",
            "-m",
            "-p",
            "--preserve-environment",
            "-mm",
            "-M",
            "--mount-master",
        ):
            continue
        elif a in ("-v", "--version"):
            print("26.4:MAGISK", file=t.out)
            return 0
        elif a == "-V":
            print("26400", file=t.out)
            return 0
        elif a.startswith("-") and not rest:
            print(f"su: invalid option -- {a.lstrip('-')}", file=t.err)
            return 2
        else:
            rest.append(a)
            rest.extend(args)
            break
    if rest and rest[0] in ("0", "root"):
        rest.pop(0)
    elif rest and rest[0].isdigit():
        print("su: only root (uid 0) is supported on this lab phone", file=t.err)
        return 1
    fault = str(t.state().get("faults", {}).get("strace", "none"))
    if fault != "none":
        deny_tracing(fault)
    env = dict(os.environ)
    env[UID_ENV] = "0"
    env["USER"] = "root"
    env["HOME"] = "/data"
    t.out.flush()
    t.err.flush()
    if command is not None:
        argv = [shell, "-c", command]
    elif rest:
        argv = rest
    else:
        argv = [shell]
    try:
        os.execvpe(argv[0], argv, env)
    except OSError as exc:
        print(f"su: {argv[0]}: {exc.strerror}", file=t.err)
        return 127
    return 0


HANDLERS: dict[str, Callable[[Tool], int]] = {
    "getprop": tool_getprop,
    "setprop": tool_setprop,
    "pm": tool_pm,
    "cmd": tool_cmd,
    "am": tool_am,
    "input": tool_input,
    "uiautomator": tool_uiautomator,
    "dumpsys": tool_dumpsys,
    "settings": tool_settings,
    "su": tool_su,
    "id": tool_id,
    "whoami": tool_whoami,
    "pidof": tool_pidof,
    "ps": tool_ps,
    "date": tool_date,
    "wm": tool_wm,
    "monkey": tool_monkey,
    "logcat": tool_logcat,
    "screencap": tool_screencap,
    "getenforce": tool_getenforce,
    "ime": tool_ime,
}


def run_tool(name: str, args: list[str]) -> int:
    """Run one toolbox command the way a shim invokes it; returns the exit status."""
    preload = os.environ.pop("FLOWTRUTH_FT_PRELOAD", None)
    if preload:  # the shim ran us without libfaketime; what we start gets it back
        os.environ["LD_PRELOAD"] = preload
        os.environ[FAKETIME_ENV] = "1"
    state_dir = os.environ.get(STATE_ENV)
    if not state_dir or not os.path.exists(state_path(state_dir)):
        print(f"{name}: phone state not found (is {STATE_ENV} set?)", file=sys.stderr)
        return 1
    handler = HANDLERS.get(name)
    if handler is None:
        print(f"{name}: inaccessible or not found", file=sys.stderr)
        return 127
    try:
        return handler(Tool(state_dir, args, sys.stdout, sys.stderr))
    except BrokenPipeError:
        return 141
    except (OSError, ValueError, KeyError) as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return 1
