"""Scripted app sessions: the scenario schema (``controller/scenarios/*.yaml``) and its runner.

A scenario file describes one app and its activities; each activity is a list of steps,
each step a mapping with one key::

    app: signal
    package: org.thoughtcrime.securesms
    activity: org.thoughtcrime.securesms.RoutingActivity   # launcher activity
    params: {contact: Alice, message: "hello"}              # defaults; plans override
    activities:
      chat:
        - launch: {}
        - tap: {text: "{contact}"}
        - type: {text: "{message}"}
        - tap: {resource_id: "org.thoughtcrime.securesms:id/send_button"}
        - wait: {seconds: 2, dwell: [1, 4]}

Steps: ``launch`` (``am start -W``), ``tap`` (a node of ``uiautomator dump`` by ``text``,
``resource_id`` or ``content_desc``; retried while uiautomator "could not get idle
state" or the node is not there yet), ``type`` (into the focused field: printable ASCII
with ``input text``, anything else through the ADBKeyBoard IME; see
:func:`controller.device.type_text`), ``key`` (``input keyevent``), ``swipe``,
``wait`` (seconds plus an optional seeded random dwell), ``assert`` (a node is on
screen), ``stop`` (``am force-stop``). ``{name}`` in a string is a parameter.
"""

from __future__ import annotations

import random
import re
import shlex
import string
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from controller.device import DeviceLink, type_text
from controller.errors import ConfigError, ControllerError

SCENARIO_DIR = Path(__file__).resolve().parent / "scenarios"
ACTIVITIES = ("chat", "media", "audio_call", "video_call", "idle")
APPS = {"signal": "org.thoughtcrime.securesms", "telegram": "org.telegram.messenger",
        "whatsapp": "com.whatsapp"}


class ScenarioFailed(ControllerError):
    """A scenario step could not be done (a selector not found, an assertion false)."""


class _M(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Selector(_M):
    """A node of the screen: every field given must match (exact, or regex with ``~``)."""

    text: str | None = None
    resource_id: str | None = None
    content_desc: str | None = None
    index: int = 0
    """Which of several matching nodes (document order)."""

    @model_validator(mode="after")
    def _something(self) -> Selector:
        if not (self.text or self.resource_id or self.content_desc):
            raise ValueError("a selector needs text, resource_id or content_desc")
        return self

    def describe(self) -> str:
        parts = [f"{k}={v!r}" for k, v in (("text", self.text), ("resource_id", self.resource_id),
                                           ("content_desc", self.content_desc)) if v]
        return ", ".join(parts)


class Launch(_M):
    activity: str | None = None
    """Component to start; default the scenario's launcher activity."""


class Tap(Selector):
    retries: int = Field(default=5, ge=0)
    """Further dumps while the node is missing or uiautomator is not idle."""
    long: bool = False
    optional: bool = False
    """Skip the tap when the node is not there (e.g. a contact list the app skipped)."""


class TypeText(_M):
    text: str
    """Typed into the focused field (tap it first); any Unicode text."""
    enter: bool = False
    """Press ENTER afterwards."""

    @model_validator(mode="after")
    def _encodable(self) -> TypeText:
        try:
            self.text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise ValueError(f"text has an unpaired surrogate at character {err.start}") from None
        return self


class Key(_M):
    key: str = Field(pattern=r"^(KEYCODE_)?[A-Z0-9_]+$|^\d+$")


class Swipe(_M):
    x1: int
    y1: int
    x2: int
    y2: int
    ms: int = 300


class Wait(_M):
    seconds: float | str = 0.0
    """Seconds (or a ``{parameter}`` holding them)."""
    dwell: tuple[float, float] | None = None
    """Extra random seconds in [low, high] (seeded per session)."""

    @model_validator(mode="after")
    def _order(self) -> Wait:
        if isinstance(self.seconds, str) and not re.fullmatch(r"\{\w+\}", self.seconds):
            try:
                ok = float(self.seconds) >= 0
            except ValueError:
                ok = False
            if not ok:
                raise ValueError(f"seconds must be a number >= 0, not {self.seconds!r}")
        elif isinstance(self.seconds, float) and self.seconds < 0:
            raise ValueError("seconds must be >= 0")
        if self.dwell and not 0 <= self.dwell[0] <= self.dwell[1]:
            raise ValueError("dwell must be [low, high] with 0 <= low <= high")
        return self


class Assert(Selector):
    absent: bool = False
    retries: int = Field(default=3, ge=0)


class Stop(_M):
    pass


STEP_KINDS: dict[str, type[BaseModel]] = {
    "launch": Launch, "tap": Tap, "type": TypeText, "key": Key, "swipe": Swipe,
    "wait": Wait, "assert": Assert, "stop": Stop,
}


@dataclass(frozen=True, slots=True)
class Step:
    kind: str
    args: Any

    def describe(self) -> str:
        a = self.args
        if isinstance(a, Selector):
            return f"{self.kind} {a.describe()}"
        if isinstance(a, TypeText):
            return f"type {a.text!r}"
        if isinstance(a, Key):
            return f"key {a.key}"
        if isinstance(a, Wait):
            return f"wait {float(a.seconds):g}s" + (f" + dwell {a.dwell[0]:g}..{a.dwell[1]:g}s"
                                            if a.dwell else "")
        if isinstance(a, Launch):
            return "launch" + (f" {a.activity}" if a.activity else "")
        return self.kind


class ScenarioFile(_M):
    app: str = Field(min_length=1)
    package: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)+$")
    activity: str = Field(min_length=1)
    """Launcher activity (``am start -W -n package/activity``)."""
    params: dict[str, str] = Field(default_factory=dict)
    activities: dict[str, list[dict[str, Any]]]


@dataclass(frozen=True)
class Scenario:
    """A checked scenario file."""

    path: Path
    app: str
    package: str
    activity: str
    params: dict[str, str]
    activities: dict[str, list[Step]]

    def steps(self, activity: str, params: dict[str, str] | None = None) -> list[Step]:
        """The steps of one activity with parameters filled in."""
        if activity not in self.activities:
            raise ConfigError(f"{self.path}: no activity {activity!r}",
                              hint="has: " + ", ".join(self.activities))
        values = {**self.params, **(params or {})}
        out = []
        for i, st in enumerate(self.activities[activity]):
            out.append(Step(st.kind, _fill(st.args, values,
                                           f"{self.path}: activities.{activity}[{i}]")))
        return out


def _fill(model: Any, values: dict[str, str], where: str) -> Any:
    upd = {}
    for name, v in model:
        if isinstance(v, str) and "{" in v:
            try:
                names = [f for _, f, _, _ in string.Formatter().parse(v) if f]
                missing = [n for n in names if n not in values]
                if missing:
                    raise ConfigError(f"{where}: parameter {missing[0]!r} is not given",
                                      hint="set it under params: or in the plan's scenario overrides")
                upd[name] = v.format_map(values)
            except ValueError as err:
                raise ConfigError(f"{where}.{name}: bad placeholder: {err}") from None
    if not upd:
        return model
    try:
        return type(model).model_validate({**model.model_dump(), **upd})
    except ValidationError as err:
        e = err.errors()[0]
        raise ConfigError(f"{where}: {_loc(e['loc'])}: {e['msg']}") from None


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for p in loc:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def load_scenario(path: str | Path) -> Scenario:
    """Read and check a scenario file; :class:`ConfigError` names the file and field."""
    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(f"{p}: cannot read: {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{p}: not UTF-8 text (byte offset {err.start})") from None
    except RecursionError:
        raise ConfigError(f"{p}: not valid YAML: nested too deeply") from None
    except ValueError as err:  # e.g. an integer of more digits than Python converts
        raise ConfigError(f"{p}: not valid YAML: {str(err).splitlines()[0][:120]}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{p}: not valid YAML: {err}".splitlines()[0]) from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: a scenario must be a mapping (app, package, activities)")
    try:
        f = ScenarioFile.model_validate(raw)
    except ValidationError as err:
        e = err.errors()[0]
        raise ConfigError(f"{p}: field {_loc(e['loc'])}: {e['msg']}") from None
    acts: dict[str, list[Step]] = {}
    for name, steps in f.activities.items():
        if not steps:
            raise ConfigError(f"{p}: field activities.{name}: no steps")
        out = []
        for i, st in enumerate(steps):
            where = f"{p}: field activities.{name}[{i}]"
            if not isinstance(st, dict) or len(st) != 1:
                raise ConfigError(f"{where}: a step is a mapping with exactly one key",
                                  hint="one of " + ", ".join(STEP_KINDS))
            (kind, args), = st.items()
            if kind not in STEP_KINDS:
                raise ConfigError(f"{where}: unknown step {kind!r}",
                                  hint="one of " + ", ".join(STEP_KINDS))
            try:
                model = STEP_KINDS[kind].model_validate(args or {})
            except ValidationError as err:
                e = err.errors()[0]
                field = _loc(e["loc"])
                raise ConfigError(f"{where}.{kind}{'.' + field if field else ''}: "
                                  f"{e['msg']}") from None
            out.append(Step(kind, model))
        acts[name] = out
    sc = Scenario(p, f.app, f.package, f.activity, dict(f.params), acts)
    for name in acts:  # every placeholder must have a default or be declared
        try:
            sc.steps(name)
        except ConfigError as err:
            raise ConfigError(err.message, hint="add a default under params:") from None
    return sc


def scenario_for(app: str, directory: Path | None = None) -> Scenario:
    """The shipped (or ``directory``'s) scenario of an app by name or package."""
    d = directory or SCENARIO_DIR
    name = next((k for k, v in APPS.items() if v == app), app)
    p = d / f"{name}.yaml"
    if not p.exists():
        raise ConfigError(f"no scenario for app {app!r} in {d}",
                          hint="known: " + ", ".join(sorted(x.stem for x in d.glob("*.yaml"))))
    return load_scenario(p)


# --------------------------------------------------------------------------- runner


@dataclass(frozen=True, slots=True)
class Node:
    text: str
    resource_id: str
    content_desc: str
    bounds: tuple[int, int, int, int]

    @property
    def center(self) -> tuple[int, int]:
        x1, y1, x2, y2 = self.bounds
        return (x1 + x2) // 2, (y1 + y2) // 2


_BOUNDS = re.compile(r"\[(-?\d+),(-?\d+)\]\[(-?\d+),(-?\d+)\]")


def parse_screen(xml: str) -> list[Node]:
    """The nodes of a ``uiautomator dump`` document (trailing chatter ignored)."""
    start, end = xml.find("<"), xml.rfind(">")
    if start < 0 or end < 0:
        return []
    try:
        root = ET.fromstring(xml[start:end + 1])
    except ET.ParseError:
        return []
    out = []
    for n in root.iter("node"):
        m = _BOUNDS.fullmatch(n.get("bounds", ""))
        b = tuple(int(x) for x in m.groups()) if m else (0, 0, 0, 0)
        out.append(Node(n.get("text", ""), n.get("resource-id", ""), n.get("content-desc", ""),
                        b))  # type: ignore[arg-type]
    return out


def _match(want: str | None, have: str) -> bool:
    if want is None:
        return True
    if want.startswith("~"):
        return re.search(want[1:], have) is not None
    return want == have


def find(nodes: list[Node], sel: Selector) -> Node | None:
    hits = [n for n in nodes if _match(sel.text, n.text) and _match(sel.resource_id, n.resource_id)
            and _match(sel.content_desc, n.content_desc)]
    return hits[sel.index] if len(hits) > sel.index else None


class ScenarioRunner:
    """Runs scenario steps on a phone; ``cancel`` is checked between steps and during waits."""

    def __init__(self, link: DeviceLink, scenario: Scenario, *, seed: int = 0,
                 cancel: threading.Event | None = None, wait_scale: float = 1.0,
                 retry_delay: float = 0.3,
                 on_step: Callable[[int, int, str], None] | None = None) -> None:
        self.link = link
        self.sc = scenario
        self.rng = random.Random(seed)
        self.cancel = cancel or threading.Event()
        self.wait_scale = wait_scale
        self.retry_delay = retry_delay
        self.on_step = on_step
        self.log: list[dict[str, Any]] = []

    def run(self, steps: list[Step]) -> None:
        for i, st in enumerate(steps):
            if self.cancel.is_set():
                raise ScenarioCancelled("cancelled")
            if self.on_step:
                self.on_step(i, len(steps), st.describe())
            t0 = time.time()
            detail = getattr(self, f"_do_{st.kind}")(st.args)
            self.log.append({"index": i, "step": st.describe(), "at": t0,
                             "took_s": round(time.time() - t0, 3), "detail": detail})

    def _sh(self, cmd: str, what: str, timeout: float = 30) -> str:
        r = self.link.shell(cmd, timeout=timeout)
        if not r.ok:
            raise ScenarioFailed(f"{self.link.serial}: {what}: exit {r.returncode}: "
                                 f"{(r.stderr or r.stdout).strip()[:200]}")
        return r.stdout

    def _do_launch(self, a: Launch) -> str:
        comp = f"{self.sc.package}/{a.activity or self.sc.activity}"
        out = self._sh(f"am start -W -n {shlex.quote(comp)}", f"launch {comp}")
        if "Error" in out and "Warning" not in out:
            raise ScenarioFailed(f"{self.link.serial}: launch {comp}: {out.strip().splitlines()[-1]}",
                                 hint="is the app installed?")
        m = re.search(r"TotalTime: (\d+)", out)
        return f"TotalTime {m.group(1)} ms" if m else "started"

    def dump(self) -> list[Node] | None:
        """The current screen, or None when uiautomator could not get an idle state."""
        r = self.link.shell("uiautomator dump /sdcard/window_dump.xml >/dev/null 2>&1; "
                            "cat /sdcard/window_dump.xml", timeout=30)
        text = r.stdout
        if "could not get idle state" in text or "<hierarchy" not in text:
            return None
        return parse_screen(text)

    def _locate(self, sel: Selector, retries: int) -> Node | None:
        for attempt in range(retries + 1):
            nodes = self.dump()
            if nodes is not None:
                n = find(nodes, sel)
                if n is not None:
                    return n
            if attempt < retries:
                self._sleep(self.retry_delay)
        return None

    def _do_tap(self, a: Tap) -> str:
        n = self._locate(a, 0 if a.optional else a.retries)
        if n is None and a.optional:
            return "not on screen; skipped"
        if n is None:
            raise ScenarioFailed(f"{self.link.serial}: no node with {a.describe()} on screen",
                                 hint="check the selector against `uiautomator dump`")
        x, y = n.center
        if a.long:
            self._sh(f"input swipe {x} {y} {x} {y} 800", "long tap")
        else:
            self._sh(f"input tap {x} {y}", "tap")
        return f"tapped {x},{y}"

    def _do_type(self, a: TypeText) -> str:
        how = type_text(self.link, a.text)
        if a.enter:
            self._sh("input keyevent KEYCODE_ENTER", "enter")
        return f"{len(a.text)} characters ({how})"

    def _do_key(self, a: Key) -> str:
        k = a.key if a.key.isdigit() or a.key.startswith("KEYCODE_") else f"KEYCODE_{a.key}"
        self._sh(f"input keyevent {shlex.quote(k)}", f"key {k}")
        return k

    def _do_swipe(self, a: Swipe) -> str:
        self._sh(f"input swipe {a.x1} {a.y1} {a.x2} {a.y2} {a.ms}", "swipe")
        return "swiped"

    def _do_wait(self, a: Wait) -> str:
        s = float(a.seconds) + (self.rng.uniform(*a.dwell) if a.dwell else 0.0)
        self._sleep(s * self.wait_scale)
        return f"waited {s * self.wait_scale:.2f}s"

    def _do_assert(self, a: Assert) -> str:
        if a.absent:
            for _attempt in range(a.retries + 1):
                nodes = self.dump()
                if nodes is not None and find(nodes, a) is None:
                    return "absent"
                self._sleep(self.retry_delay)
            raise ScenarioFailed(f"{self.link.serial}: {a.describe()} is still on screen")
        if self._locate(a, a.retries) is None:
            raise ScenarioFailed(f"{self.link.serial}: expected {a.describe()} on screen")
        return "present"

    def _do_stop(self, a: Stop) -> str:
        self._sh(f"am force-stop {shlex.quote(self.sc.package)}", "force-stop")
        return "stopped"

    def _sleep(self, s: float) -> None:
        if self.cancel.wait(max(0.0, s)):
            raise ScenarioCancelled("cancelled")


class ScenarioCancelled(ControllerError):
    """The scenario stopped because its session was cancelled."""

