"""Scripted app sessions: the scenario schema (``controller/scenarios/*.yaml``) and its runner.

A scenario file describes one app: its screens (each recognised by anchors in the
``uiautomator dump``), the moves between them, and its activities; each activity is a list
of steps (or one list per role: ``solo``, ``caller``, ``callee``), each step a mapping with
one key::

    app: signal
    package: org.thoughtcrime.securesms
    activity: org.thoughtcrime.securesms.RoutingActivity   # launcher activity
    params: {contact: Alice, message: "hello"}              # defaults; plans override
    screens:
      chat_list: {anchors: [{id: chat_list_fab}]}
      conversation:
        anchors: [{id: conversation_title_view}, {id: text_editor}]
        context: {id: conversation_title, text_starts: "{contact}"}
        parent: chat_list                                  # BACK leads there
    moves:
      - {from: chat_list, to: conversation, do: [{tap: {id: chat_list_item_name, text_starts: "{contact}"}}]}
    verify:                                                # evidence of verified actions
      bubble: {id: message_body}
      sent: {id: delivery_status, content_desc: "@status_sent_or_better"}
      hangup: {id: end_call}
    activities:
      chat:
        - goto: conversation
        - tap: {id: text_editor}
        - type: {text: "{message}"}
        - tap: {id: send_button}
        - sent: {text: "{message}"}

Selectors name a node by ``text``/``content_desc`` (exact; ``~regex``; ``@name``, a string
of the per-language table ``controller/scenarios/selectors.yaml`` in the phone's language),
``text_starts``/``desc_starts``/``text_contains``/``desc_contains``, ``resource_id`` (full)
or ``id`` (a symbolic id of the table), ``class_name``, ``package``, ``inside`` (an
ancestor's id) and ``any`` (one of several selectors).

Steps: ``launch``, ``goto`` (reach a screen from wherever the app is: moves, BACK, relaunch,
dismissing known interruptions on the way), ``await`` (wait for a screen without moving,
e.g. an incoming call), ``tap``, ``type``, ``key``, ``swipe``, ``wait``, ``assert``, ``stop``,
``view`` (a deep link), and the verified actions ``sent`` (a message's bubble reaches the sent
state), ``received`` (a message from the peer shows up), ``connected`` (the in-call screen
shows the call connected), ``placed`` (the call screen is up, ringing or connected) and
``hangup`` (end the call; fine when the peer already ended it). ``{name}`` in a string is a
parameter. An action that cannot be verified raises :class:`ScenarioFailed` with the reason;
the last screen's dump is saved as ``scenario_last_screen.xml`` in ``run_dir``.
"""

from __future__ import annotations

import functools
import os
import random
import re
import secrets
import shlex
import threading
import time
import xml.etree.ElementTree as ET
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from controller.device import DeviceLink, shell_many, type_text
from controller.errors import ConfigError, ControllerError, DeviceError

SCENARIO_DIR = Path(__file__).resolve().parent / "scenarios"
TABLE_FILE = "selectors.yaml"
ACTIVITIES = ("chat", "media", "audio_call", "video_call", "idle")
APPS = {"signal": "org.thoughtcrime.securesms", "telegram": "org.telegram.messenger",
        "whatsapp": "com.whatsapp"}
ROLES = ("solo", "caller", "callee")
LAST_SCREEN_FILE = "scenario_last_screen.xml"
NAME_RE = re.compile(r"[a-z0-9_]+")
PARAM_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
TIMER_RE = r"~^\d{1,2}:\d{2}(:\d{2})?$"
"""An elapsed call time (m:ss, mm:ss or h:mm:ss): the call-connected evidence of every app."""


class ScenarioFailed(ControllerError):
    """A scenario step could not be done (a selector not found, an action not verified)."""


class ScenarioCancelled(ControllerError):
    """The scenario stopped because its session was cancelled."""


# --------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class AppTable:
    name: str
    package: str
    verified_version: str
    ids: dict[str, str]
    strings: dict[str, dict[str, str]]
    """symbolic name -> {locale: text}"""


@dataclass(frozen=True)
class Table:
    """The per-app ids and per-language strings every scenario selector comes from."""

    path: Path
    locales: tuple[str, ...]
    apps: dict[str, AppTable]

    def sections(self, app: str) -> list[AppTable]:
        """Where a scenario of ``app`` looks names up: its own section, then Android's."""
        return [t for t in (self.apps.get(app), self.apps.get("system")) if t is not None]

    def id(self, app: str, name: str) -> str | None:
        return next((t.ids[name] for t in self.sections(app) if name in t.ids), None)

    def string(self, app: str, name: str, locale: str) -> str | None:
        for t in self.sections(app):
            if name in t.strings:
                return t.strings[name].get(locale)
        return None

    def has_string(self, app: str, name: str) -> bool:
        return any(name in t.strings for t in self.sections(app))

    def all_ids(self) -> set[str]:
        return {v for t in self.apps.values() for v in t.ids.values()}


def load_table(path: str | Path | None = None) -> Table:
    """Read and check the selector table (``controller/scenarios/selectors.yaml``)."""
    p = Path(path) if path is not None else SCENARIO_DIR / TABLE_FILE
    try:
        mtime = p.stat().st_mtime_ns
    except OSError as err:
        raise ConfigError(f"{p}: cannot read the selector table: {err.strerror}") from None
    return _load_table(str(p), mtime)


@functools.lru_cache(maxsize=8)
def _load_table(path: str, _mtime: int) -> Table:
    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{p}: cannot read the selector table: {str(err).splitlines()[0]}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("apps"), dict):
        raise ConfigError(f"{p}: the selector table needs locales: and apps:")
    locales = tuple(str(x) for x in raw.get("locales") or ())
    apps = {}
    for name, sec in raw["apps"].items():
        where = f"{p}: apps.{name}"
        if not isinstance(sec, dict):
            raise ConfigError(f"{where}: must be a mapping")
        ids = {}
        for k, v in (sec.get("ids") or {}).items():
            rid = v.get("id") if isinstance(v, dict) else None
            if not isinstance(rid, str) or not re.fullmatch(r"[\w.]+:id/\w+", rid) \
                    or not (isinstance(v, dict) and v.get("source")):
                raise ConfigError(f"{where}.ids.{k}: needs id: PACKAGE:id/NAME and source:")
            ids[str(k)] = rid
        strings = {}
        for k, v in (sec.get("strings") or {}).items():
            if not isinstance(v, dict) or not v.get("source"):
                raise ConfigError(f"{where}.strings.{k}: needs a text per locale and source:")
            per = {}
            for loc in locales:
                s = v.get(loc)
                if not isinstance(s, str) or not s:
                    raise ConfigError(f"{where}.strings.{k}: no {loc!r} text")
                if s.startswith("~"):
                    try:
                        re.compile(s[1:])
                    except re.error as err:
                        raise ConfigError(f"{where}.strings.{k}.{loc}: bad regex: {err}") from None
                per[loc] = s
            strings[str(k)] = per
        apps[str(name)] = AppTable(str(name), str(sec.get("package", "")),
                                   str(sec.get("verified_version") or ""), ids, strings)
    return Table(p, locales, apps)


def language(locale: str | None) -> str:
    """``de-DE`` / ``de_DE`` / ``de`` -> ``de``; empty -> ``en`` (Android's default)."""
    loc = (locale or "").strip()
    return re.split(r"[-_]", loc)[0].lower() if loc else "en"


def check_locale(locale: str | None, app: str, table: Table | None = None) -> str | None:
    """None when the table has strings in the phone's language for ``app`` (or the app is
    not in the table), else the one-line reason with the fix."""
    t = table or load_table()
    name = next((k for k, v in APPS.items() if v == app), app)
    if name not in t.apps:
        return None
    lang = language(locale)
    if lang in t.locales:
        return None
    return (f"the phone's language is {locale!r}, but the selector table has {name}'s texts only "
            f"in {', '.join(t.locales)}: add {lang!r} texts to {t.path} or set the phone's "
            f"language to one of them (Settings > System > Languages)")


def check_version(version: str | None, app: str, table: Table | None = None) -> str | None:
    """A warning when the phone's app version differs from the one the selectors were
    verified on (``verified_version`` is a prefix of the versionName)."""
    t = table or load_table()
    name = next((k for k, v in APPS.items() if v == app), app)
    sec = t.apps.get(name)
    if sec is None or not sec.verified_version or not version:
        return None
    if version == sec.verified_version or version.startswith(sec.verified_version + "."):
        return None
    return (f"{name} {version} is installed, but its selectors were verified on "
            f"{sec.verified_version}: check them with `flowtruth scenario probe` before a long run")


def read_locale(link: DeviceLink) -> str:
    """The phone's locale: ``persist.sys.locale``, else ``ro.product.locale`` ('' if unset)."""
    a, b = shell_many(link, ["getprop persist.sys.locale", "getprop ro.product.locale"], timeout=20)
    return a.strip() or b.strip()


def read_app_version(link: DeviceLink, package: str) -> str | None:
    r = link.shell(f"dumpsys package {shlex.quote(package)} | grep versionName", timeout=20)
    m = re.search(r"versionName=(\S+)", r.stdout)
    return m.group(1) if m else None


# --------------------------------------------------------------------------- schema


class _M(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


_MATCH_FIELDS = ("text", "text_starts", "text_contains", "content_desc", "desc_starts",
                 "desc_contains", "resource_id", "id", "class_name", "package", "inside")


class Selector(_M):
    """A node of the screen: every field given must match.

    ``text``/``content_desc``/``resource_id``/``class_name``/``package``: exact, or a regex
    with ``~``; ``text``/``content_desc``/``*_starts``/``*_contains`` also take ``@name``, a
    string of the table in the phone's language. ``id``: a symbolic id of the table.
    ``inside``: a symbolic (or full) id of an ancestor. ``any``: one of these selectors.
    """

    text: str | None = None
    text_starts: str | None = None
    text_contains: str | None = None
    content_desc: str | None = None
    desc_starts: str | None = None
    desc_contains: str | None = None
    resource_id: str | None = None
    id: str | None = None
    class_name: str | None = None
    package: str | None = None
    inside: str | None = None
    any: tuple[Selector, ...] | None = None
    index: int = Field(default=0, ge=0)
    """Which of several matching nodes (document order)."""

    @model_validator(mode="after")
    def _something(self) -> Selector:
        if not (any(getattr(self, f) for f in _MATCH_FIELDS) or self.any):
            raise ValueError("a selector needs text, resource_id, content_desc, id, ... or any")
        for f in ("text", "content_desc", "resource_id", "class_name", "package"):
            v = getattr(self, f)
            if v and v.startswith("~") and "{" not in v:
                try:
                    re.compile(v[1:])
                except re.error as err:
                    raise ValueError(f"{f}: not a valid regular expression: {err}") from None
        if self.id is not None and not re.fullmatch(r"\w+", self.id):
            raise ValueError(f"id: a symbolic name of the selector table, not {self.id!r}")
        return self

    def describe(self) -> str:
        parts = [f"{k}={getattr(self, k)!r}" for k in _MATCH_FIELDS if getattr(self, k)]
        if self.any:
            parts.append("any(" + " | ".join(s.describe() for s in self.any) + ")")
        if self.index:
            parts.append(f"index={self.index}")
        return ", ".join(parts)

    def names(self) -> Iterable[tuple[str, str]]:
        """("id", name) and ("string", name) references to the table, and ("resource_id", full)."""
        if self.id:
            yield "id", self.id
        if self.inside:
            yield ("resource_id" if ":id/" in self.inside else "id"), self.inside
        if self.resource_id and not self.resource_id.startswith("~"):
            yield "resource_id", self.resource_id
        for f in ("text", "text_starts", "text_contains", "content_desc", "desc_starts",
                  "desc_contains"):
            v = getattr(self, f)
            if v and v.startswith("@"):
                yield "string", v[1:]
        for s in self.any or ():
            yield from s.names()


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


def _seconds_ok(v: float | str, what: str) -> None:
    if isinstance(v, str) and not re.fullmatch(r"\{\w+\}", v):
        try:
            ok = float(v) >= 0
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(f"{what} must be a number >= 0, not {v!r}")
    elif isinstance(v, (int, float)) and v < 0:
        raise ValueError(f"{what} must be >= 0")


class Wait(_M):
    seconds: float | str = 0.0
    """Seconds (or a ``{parameter}`` holding them)."""
    dwell: tuple[float, float] | None = None
    """Extra random seconds in [low, high] (seeded per session)."""

    @model_validator(mode="after")
    def _order(self) -> Wait:
        _seconds_ok(self.seconds, "seconds")
        if self.dwell and not 0 <= self.dwell[0] <= self.dwell[1]:
            raise ValueError("dwell must be [low, high] with 0 <= low <= high")
        return self


class Assert(Selector):
    absent: bool = False
    retries: int = Field(default=3, ge=0)


class Stop(_M):
    pass


class Goto(_M):
    screen: str
    timeout: float | str = 60.0

    @model_validator(mode="after")
    def _t(self) -> Goto:
        _seconds_ok(self.timeout, "timeout")
        return self


class Await(_M):
    screen: str | tuple[str, ...]
    timeout: float | str = 60.0
    """Seconds to wait (the callee's wait for the incoming call)."""

    @model_validator(mode="after")
    def _t(self) -> Await:
        _seconds_ok(self.timeout, "timeout")
        return self

    @property
    def screens(self) -> tuple[str, ...]:
        return (self.screen,) if isinstance(self.screen, str) else tuple(self.screen)


class View(_M):
    uri: str = Field(min_length=1)
    """``am start -a android.intent.action.VIEW -d URI`` in the app's package."""


class Sent(_M):
    text: str = ""
    """The message (contained in its bubble); empty: the newest sent-state on screen (media)."""
    timeout: float | str = 30.0

    @model_validator(mode="after")
    def _t(self) -> Sent:
        _seconds_ok(self.timeout, "timeout")
        return self


class Received(Sent):
    text: str = Field(min_length=1)
    timeout: float | str = 120.0


class Connected(_M):
    timeout: float | str = 60.0

    @model_validator(mode="after")
    def _t(self) -> Connected:
        _seconds_ok(self.timeout, "timeout")
        return self


class Placed(Connected):
    timeout: float | str = 30.0


class Hangup(_M):
    pass


STEP_KINDS: dict[str, type[BaseModel]] = {
    "launch": Launch, "tap": Tap, "type": TypeText, "key": Key, "swipe": Swipe,
    "wait": Wait, "assert": Assert, "stop": Stop, "goto": Goto, "await": Await, "view": View,
    "sent": Sent, "received": Received, "connected": Connected, "placed": Placed,
    "hangup": Hangup,
}
MOVE_KINDS = ("launch", "tap", "type", "key", "swipe", "wait", "view", "stop")
VERIFYING = ("sent", "received", "connected", "placed", "hangup", "await", "goto")


@dataclass(frozen=True, slots=True)
class Step:
    kind: str
    args: Any
    params: dict[str, str] | None = field(default=None, compare=False)
    """The parameter values the step was filled with (the runner fills screens with them)."""

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
        if isinstance(a, Goto):
            return f"goto {a.screen}"
        if isinstance(a, Await):
            return f"await {' or '.join(a.screens)} ({float(a.timeout):g}s)"
        if isinstance(a, View):
            return f"view {a.uri}"
        if isinstance(a, (Sent, Received)):
            return f"{self.kind} {a.text!r}" if a.text else f"{self.kind} (the newest message)"
        return self.kind


class ScreenDef(_M):
    anchors: tuple[Selector, ...] = Field(min_length=1)
    """All must be on screen."""
    absent: tuple[Selector, ...] = ()
    """None may be on screen."""
    context: Selector | None = None
    """The screen shows the right chat/contact (parameters filled in)."""
    parent: str | None = None
    """The screen BACK leads to."""


class MoveDef(_M):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    from_: str = Field(alias="from")
    to: str
    do: tuple[dict[str, Any], ...] = Field(min_length=1)


class Interruption(_M):
    name: str
    when: tuple[Selector, ...] = Field(min_length=1)
    tap: Selector


class VerifyDef(_M):
    bubble: Selector | None = None
    """A message bubble (the message text is added as ``text_contains``)."""
    sent: Selector | None = None
    """The sent/delivered evidence in the bubble's row (the bubble or an ancestor's subtree)."""
    row_levels: int = Field(default=3, ge=0, le=8)
    hangup: Selector | None = None
    """The end-call button."""
    call_screens: tuple[str, ...] = ("in_call", "outgoing_call", "incoming_call")


class ScenarioFile(_M):
    app: str = Field(min_length=1)
    package: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)+$")
    activity: str = Field(min_length=1)
    """Launcher activity (``am start -W -n package/activity``)."""
    table: str | None = None
    """The table section (default: ``app``)."""
    params: dict[str, str] = Field(default_factory=dict)
    screens: dict[str, ScreenDef] = Field(default_factory=dict)
    moves: tuple[MoveDef, ...] = ()
    interruptions: tuple[Interruption, ...] = ()
    verify: VerifyDef = Field(default_factory=VerifyDef)
    activities: dict[str, list[dict[str, Any]] | dict[str, list[dict[str, Any]]]]

    @field_validator("params")
    @classmethod
    def _param_names(cls, v: dict[str, str]) -> dict[str, str]:
        for k in v:
            if not PARAM_RE.fullmatch(k):
                raise ValueError(f"parameter name {k!r}: use letters, digits and _ only")
        return v


@dataclass(frozen=True)
class Scenario:
    """A checked scenario file."""

    path: Path
    app: str
    package: str
    activity: str
    params: dict[str, str]
    activities: dict[str, dict[str, list[Step]]]
    """activity -> role -> steps (a plain list is stored under every role)."""
    screens: dict[str, ScreenDef] = field(default_factory=dict)
    moves: tuple[tuple[str, str, tuple[Step, ...]], ...] = ()
    interruptions: tuple[Interruption, ...] = ()
    verify: VerifyDef = field(default_factory=VerifyDef)
    table_app: str = ""

    def values(self, params: dict[str, str] | None = None, role: str = "solo") -> dict[str, str]:
        """The parameter values: defaults, ``params``, ``role``, and a random ``token`` unless
        given (it makes a session's messages unique on screen; give both phones of a pair the
        same one). Defaults may use other parameters (one level deep)."""
        bad = [k for k in (params or {}) if not PARAM_RE.fullmatch(str(k))]
        if bad:
            raise ConfigError(f"parameter name {str(bad[0])[:60]!r}: use letters, digits and _ only")
        values = {**self.params, **{str(k): str(v) for k, v in (params or {}).items()},
                  "role": role}
        if not values.get("token"):
            values["token"] = secrets.token_hex(3)
        given = {str(k) for k in (params or {})}
        for k, v in list(values.items()):  # the scenario's defaults; a given value is no template
            if k not in given and k in self.params and ("{" in v or "}" in v):
                values[k] = fill_text(v, values, f"{self.path}: params.{k}")
        return values

    def roles(self, activity: str) -> list[str]:
        return list(self.activities.get(activity, {}))

    def steps(self, activity: str, params: dict[str, str] | None = None,
              role: str = "solo") -> list[Step]:
        """The steps of one activity for one role with parameters filled in."""
        if activity not in self.activities:
            raise ConfigError(f"{self.path}: no activity {activity!r}",
                              hint="has: " + ", ".join(self.activities))
        if role not in ROLES:
            raise ConfigError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
        by_role = self.activities[activity]
        if role not in by_role:
            raise ConfigError(f"{self.path}: activity {activity!r} has no {role!r} steps",
                              hint="has: " + ", ".join(by_role))
        values = self.values(params, role)
        out = []
        for i, st in enumerate(by_role[role]):
            out.append(Step(st.kind, _fill(st.args, values,
                                           f"{self.path}: activities.{activity}[{i}]"),
                            dict(values)))
        return out


def fill_text(v: str, values: dict[str, str], where: str) -> str:
    """``{name}`` -> its value; ``{{``/``}}`` are literal braces; anything else in braces is
    an error (no attribute or index access, no format specs)."""
    out, i = [], 0
    while i < len(v):
        c = v[i]
        if v.startswith("{{", i) or v.startswith("}}", i):
            out.append(c)
            i += 2
            continue
        if c == "}":
            raise ConfigError(f"{where}: bad placeholder: single '}}' in {v!r}")
        if c == "{":
            j = v.find("}", i)
            name = v[i + 1:j] if j > 0 else ""
            if j < 0 or not PARAM_RE.fullmatch(name):
                raise ConfigError(f"{where}: bad placeholder {v[i:j + 1 if j > 0 else None]!r}",
                                  hint="a placeholder is {name} (letters, digits, _)")
            if name not in values:
                raise ConfigError(f"{where}: parameter {name!r} is not given",
                                  hint="set it under params: or in the plan's scenario overrides")
            out.append(values[name])
            i = j + 1
            continue
        out.append(c)
        i += 1
    return "".join(out)


def _fill(model: Any, values: dict[str, str], where: str) -> Any:
    data = model.model_dump(by_alias=True, exclude_none=True)

    def walk(x: Any) -> Any:
        if isinstance(x, str):
            return fill_text(x, values, where) if ("{" in x or "}" in x) else x
        if isinstance(x, dict):
            return {k: walk(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [walk(v) for v in x]
        return x

    filled = walk(data)
    if filled == data:
        return model
    try:
        return type(model).model_validate(filled)
    except ValidationError as err:
        e = err.errors()[0]
        raise ConfigError(f"{where}: {_loc(e['loc'])}: "
                          f"{str(e['msg']).removeprefix('Value error, ')}") from None


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for p in loc:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _parse_step(st: Any, where: str, kinds: Iterable[str]) -> Step:
    kinds = tuple(kinds)
    if not isinstance(st, dict) or len(st) != 1:
        raise ConfigError(f"{where}: a step is a mapping with exactly one key",
                          hint="one of " + ", ".join(kinds))
    (kind, args), = st.items()
    if kind not in kinds:
        raise ConfigError(f"{where}: unknown step {kind!r}", hint="one of " + ", ".join(kinds))
    if kind in ("goto",) and isinstance(args, str):
        args = {"screen": args}
    try:
        model = STEP_KINDS[kind].model_validate(args or {})
    except ValidationError as err:
        e = err.errors()[0]
        fld = _loc(e["loc"])
        msg = str(e["msg"]).removeprefix("Value error, ")
        raise ConfigError(f"{where}.{kind}{'.' + fld if fld else ''}: {msg}") from None
    return Step(kind, model)


def _selectors_of(sc: Scenario) -> Iterable[tuple[str, Selector]]:
    """Every selector of a scenario, with where it is."""
    for name, s in sc.screens.items():
        for i, a in enumerate(s.anchors):
            yield f"screens.{name}.anchors[{i}]", a
        for i, a in enumerate(s.absent):
            yield f"screens.{name}.absent[{i}]", a
        if s.context:
            yield f"screens.{name}.context", s.context
    for i, (_f, _t, mv) in enumerate(sc.moves):
        for j, st in enumerate(mv):
            if isinstance(st.args, Selector):
                yield f"moves[{i}].do[{j}]", st.args
    for i, it in enumerate(sc.interruptions):
        for j, a in enumerate(it.when):
            yield f"interruptions[{i}].when[{j}]", a
        yield f"interruptions[{i}].tap", it.tap
    for f in ("bubble", "sent", "hangup"):
        v = getattr(sc.verify, f)
        if v is not None:
            yield f"verify.{f}", v
    for act, roles in sc.activities.items():
        for role, rsteps in roles.items():
            for i, st in enumerate(rsteps):
                if isinstance(st.args, Selector):
                    yield f"activities.{act}.{role}[{i}]", st.args


def scenario_selectors(sc: Scenario) -> list[tuple[str, Selector]]:
    return list(_selectors_of(sc))


def read_yaml(p: Path) -> Any:
    """A YAML file's content; every way it can be unreadable is one :class:`ConfigError`
    line naming the file (plans and scenarios read theirs with it)."""
    try:
        return yaml.safe_load(p.read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(f"{p}: cannot read: {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{p}: not UTF-8 text (byte offset {err.start})") from None
    except RecursionError:
        raise ConfigError(f"{p}: not valid YAML: nested too deeply") from None
    except ValueError as err:  # e.g. an integer of more digits than Python converts
        raise ConfigError(f"{p}: not valid YAML: {str(err).splitlines()[0][:120]}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{p}: not valid YAML: {str(err).splitlines()[0]}") from None


def load_scenario(path: str | Path, table: Table | None = None) -> Scenario:
    """Read and check a scenario file; :class:`ConfigError` names the file and field."""
    p = Path(path)
    raw = read_yaml(p)
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: a scenario must be a mapping (app, package, activities)")
    try:
        f = ScenarioFile.model_validate(raw)
    except ValidationError as err:
        e = err.errors()[0]
        msg = str(e["msg"]).removeprefix("Value error, ")
        raise ConfigError(f"{p}: field {_loc(e['loc'])}: {msg}") from None
    acts: dict[str, dict[str, list[Step]]] = {}
    for name, body in f.activities.items():
        if not NAME_RE.fullmatch(name):
            raise ConfigError(f"{p}: field activities.{name}: an activity name is lowercase "
                              "letters, digits and _ only (it names run directories)")
        lists = body if isinstance(body, dict) else {r: body for r in ROLES}
        if isinstance(body, dict):
            for r in body:
                if r not in ROLES:
                    raise ConfigError(f"{p}: field activities.{name}.{r}: not a role",
                                      hint="one of " + ", ".join(ROLES))
        acts[name] = {}
        for role, steps in lists.items():
            w = f"{p}: field activities.{name}" + (f".{role}" if isinstance(body, dict) else "")
            if not steps:
                raise ConfigError(f"{w}: no steps")
            if not isinstance(steps, list):
                raise ConfigError(f"{w}: a list of steps")
            acts[name][role] = [_parse_step(st, f"{w}[{i}]", STEP_KINDS)
                                for i, st in enumerate(steps)]
    moves = []
    for i, m in enumerate(f.moves):
        for end in (m.from_, m.to):
            if end != "*" and end not in f.screens:
                raise ConfigError(f"{p}: field moves[{i}]: no screen {end!r}",
                                  hint="screens: " + ", ".join(f.screens))
        moves.append((m.from_, m.to, tuple(_parse_step(st, f"{p}: field moves[{i}].do[{j}]",
                                                       MOVE_KINDS)
                                           for j, st in enumerate(m.do))))
    for name, s in f.screens.items():
        if not NAME_RE.fullmatch(name):
            raise ConfigError(f"{p}: field screens.{name}: a screen name is lowercase letters, "
                              "digits and _ only")
        if s.parent is not None and s.parent not in f.screens:
            raise ConfigError(f"{p}: field screens.{name}.parent: no screen {s.parent!r}")
    sc = Scenario(p, f.app, f.package, f.activity, dict(f.params), acts, dict(f.screens),
                  tuple(moves), f.interruptions, f.verify, f.table or f.app)
    for act, by_role in acts.items():  # screens named by steps exist
        for role, rsteps in by_role.items():
            for i, st in enumerate(rsteps):
                names = (st.args.screen,) if isinstance(st.args, Goto) else \
                    st.args.screens if isinstance(st.args, Await) else ()
                for n in names:
                    if n not in f.screens:
                        raise ConfigError(f"{p}: field activities.{act}.{role}[{i}]: no screen "
                                          f"{n!r}", hint="screens: " + ", ".join(f.screens)
                                          or "add a screens: section")
                if st.kind in ("sent", "received") and not sc.verify.bubble:
                    raise ConfigError(f"{p}: field activities.{act}.{role}[{i}]: {st.kind} "
                                      "needs verify.bubble")
    _check_names(sc, table)
    for name, roles in acts.items():  # every placeholder must have a default or be declared
        for role in roles:
            try:
                sc.steps(name, role=role)
            except ConfigError as err:
                raise ConfigError(err.message, hint="add a default under params:") from None
    return sc


def _check_names(sc: Scenario, table: Table | None) -> None:
    """Every ``id:`` and ``@string`` a scenario uses is in the table."""
    refs = [(w, kind, n) for w, s in _selectors_of(sc) for kind, n in s.names()
            if kind in ("id", "string")]
    if not refs:
        return
    t = table or load_table()
    for where, kind, n in refs:
        ok = t.id(sc.table_app, n) if kind == "id" else t.has_string(sc.table_app, n)
        if not ok:
            raise ConfigError(f"{sc.path}: field {where}: {'id' if kind == 'id' else 'string'} "
                              f"{n!r} is not in the selector table ({t.path}, apps."
                              f"{sc.table_app})", hint="add it there with its source")


def scenario_files(directory: Path | None = None) -> list[Path]:
    """The scenario files of a directory (the selector table is not one)."""
    d = directory or SCENARIO_DIR
    return sorted(x for x in d.glob("*.yaml") if x.name != TABLE_FILE)


def scenario_for(app: str, directory: Path | None = None) -> Scenario:
    """The shipped (or ``directory``'s, or ``$FLOWTRUTH_SCENARIO_DIR``'s) scenario of an app
    by name or package."""
    env = os.environ.get("FLOWTRUTH_SCENARIO_DIR")
    d = directory or (Path(env) if env else SCENARIO_DIR)
    name = next((k for k, v in APPS.items() if v == app), app)
    if not NAME_RE.fullmatch(name) and not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ConfigError(f"no scenario for app {app!r}: not an app name")
    p = d / f"{name}.yaml"
    if not p.exists() or p.name == TABLE_FILE:
        raise ConfigError(f"no scenario for app {app!r} in {d}",
                          hint="known: " + ", ".join(x.stem for x in scenario_files(d)))
    return load_scenario(p)


# --------------------------------------------------------------------------- screens


@dataclass(frozen=True, slots=True)
class Node:
    text: str
    resource_id: str
    content_desc: str
    bounds: tuple[int, int, int, int]
    cls: str = ""
    package: str = ""
    parent: int = -1
    """Index of the parent node in the parsed list (-1: a root)."""
    clickable: bool = False

    @property
    def center(self) -> tuple[int, int]:
        x1, y1, x2, y2 = self.bounds
        return (x1 + x2) // 2, (y1 + y2) // 2

    def describe(self) -> str:
        parts = [self.resource_id.split(":id/")[-1] if self.resource_id else "",
                 f"text={self.text!r}" if self.text else "",
                 f"desc={self.content_desc!r}" if self.content_desc else ""]
        x, y = self.center
        return (" ".join(p for p in parts if p) or self.cls or "node") + f" @{x},{y}"


_BOUNDS = re.compile(r"\[(-?\d+),(-?\d+)\]\[(-?\d+),(-?\d+)\]")


class Screen(list):  # type: ignore[type-arg]
    """The nodes of a dump (a list of :class:`Node`) with the raw XML."""

    xml: str = ""


def parse_screen(xml: str) -> Screen:
    """The nodes of a ``uiautomator dump`` document (trailing chatter ignored)."""
    out = Screen()
    out.xml = xml
    start, end = xml.find("<"), xml.rfind(">")
    if start < 0 or end < 0:
        return out
    try:
        root = ET.fromstring(xml[start:end + 1])
    except (ET.ParseError, RecursionError):
        return out

    def walk(el: ET.Element, parent: int) -> None:
        for n in el:
            if n.tag != "node":
                walk(n, parent)
                continue
            m = _BOUNDS.fullmatch(n.get("bounds", ""))
            b = tuple(int(x) for x in m.groups()) if m else (0, 0, 0, 0)
            out.append(Node(n.get("text", ""), n.get("resource-id", ""), n.get("content-desc", ""),
                            b, n.get("class", ""), n.get("package", ""), parent,  # type: ignore[arg-type]
                            n.get("clickable") == "true"))
            walk(n, len(out) - 1)

    walk(root, -1)
    return out


class Resolver:
    """Matches selectors against nodes with the table's ids and strings in one language."""

    def __init__(self, table: Table | None, app: str, locale: str) -> None:
        self.table, self.app, self.lang = table, app, language(locale)

    def rid(self, name: str) -> str:
        if ":id/" in name:
            return name
        v = self.table.id(self.app, name) if self.table else None
        if v is None:
            raise ScenarioFailed(f"id {name!r} is not in the selector table")
        return v

    def string(self, v: str) -> str:
        if not v.startswith("@"):
            return v
        s = self.table.string(self.app, v[1:], self.lang) if self.table else None
        if s is None:
            raise ScenarioFailed(f"string {v[1:]!r} has no {self.lang!r} text in the selector table",
                                 hint="add it to controller/scenarios/selectors.yaml")
        return s

    def _eq(self, want: str | None, have: str) -> bool:
        if want is None:
            return True
        want = self.string(want)
        if want.startswith("~"):
            return re.search(want[1:], have) is not None
        return want == have

    def _starts(self, want: str | None, have: str) -> bool:
        if want is None:
            return True
        w = self.string(want)
        if w.startswith("~"):
            return re.match(w[1:], have) is not None
        return have.startswith(w)

    def _contains(self, want: str | None, have: str) -> bool:
        if want is None:
            return True
        w = self.string(want)
        if w.startswith("~"):
            return re.search(w[1:], have) is not None
        return w in have

    def matches(self, nodes: list[Node], i: int, sel: Selector) -> bool:
        n = nodes[i]
        if sel.any and not any(self.matches(nodes, i, s) for s in sel.any):
            return False
        if sel.id is not None and n.resource_id != self.rid(sel.id):
            return False
        if not (self._eq(sel.resource_id, n.resource_id) and self._eq(sel.text, n.text)
                and self._eq(sel.content_desc, n.content_desc)
                and self._eq(sel.class_name, n.cls) and self._eq(sel.package, n.package)
                and self._starts(sel.text_starts, n.text)
                and self._starts(sel.desc_starts, n.content_desc)
                and self._contains(sel.text_contains, n.text)
                and self._contains(sel.desc_contains, n.content_desc)):
            return False
        if sel.inside is not None:
            want = self.rid(sel.inside)
            p = n.parent
            while p >= 0 and nodes[p].resource_id != want:
                p = nodes[p].parent
            if p < 0:
                return False
        return True

    def find_all(self, nodes: list[Node], sel: Selector,
                 within: Iterable[int] | None = None) -> list[int]:
        idx = range(len(nodes)) if within is None else within
        return [i for i in idx if self.matches(nodes, i, sel)]

    def find(self, nodes: list[Node], sel: Selector) -> Node | None:
        hits = self.find_all(nodes, sel)
        return nodes[hits[sel.index]] if len(hits) > sel.index else None


def find(nodes: list[Node], sel: Selector) -> Node | None:
    """The ``sel.index``-th node matching ``sel`` (literal selectors; no table)."""
    return Resolver(None, "", "en").find(nodes, sel)


def subtree(nodes: list[Node], i: int) -> list[int]:
    """``i`` and its descendants (document order)."""
    out, inside = [i], {i}
    for j in range(i + 1, len(nodes)):
        if nodes[j].parent in inside:
            out.append(j)
            inside.add(j)
    return out


def ancestor(nodes: list[Node], i: int, levels: int) -> int:
    for _ in range(levels):
        if nodes[i].parent < 0:
            break
        i = nodes[i].parent
    return i


def fill_selector(sel: Selector, values: dict[str, str], where: str = "selector") -> Selector:
    """A selector with its ``{parameters}`` filled in."""
    return _fill(sel, values, where)


_fill_sel = fill_selector


def recognise(sc: Scenario, nodes: list[Node], resolver: Resolver,
              values: dict[str, str] | None = None) -> str | None:
    """The first of the scenario's screens whose anchors are all on screen (and none of its
    ``absent`` ones), or None."""
    vals = {**sc.params, **(values or {})}
    for name, s in sc.screens.items():
        try:
            if all(resolver.find(nodes, _fill_sel(a, vals)) for a in s.anchors) and \
                    not any(resolver.find(nodes, _fill_sel(a, vals)) for a in s.absent):
                return name
        except ConfigError:
            continue
    return None


# --------------------------------------------------------------------------- interruptions

_SYSTEM_INTERRUPTIONS: tuple[Interruption, ...] = tuple(Interruption.model_validate(x) for x in (
    {"name": "permission prompt", "when": [{"id": "permission_allow_foreground"}],
     "tap": {"id": "permission_allow_foreground"}},
    {"name": "permission prompt", "when": [{"id": "permission_allow"}],
     "tap": {"id": "permission_allow"}},
    {"name": "permission prompt", "when": [{"id": "permission_allow_one_time"}],
     "tap": {"id": "permission_allow_one_time"}},
    {"name": "battery optimisation prompt",
     "when": [{"id": "dialog_positive", "package": "com.android.settings"}],
     "tap": {"id": "dialog_positive", "package": "com.android.settings"}},
    {"name": "not-now dialog", "when": [{"text": "@not_now", "class_name": "~Button|TextView"}],
     "tap": {"text": "@not_now", "class_name": "~Button|TextView"}},
    {"name": "what's-new dialog",
     "when": [{"id": "dialog_title"}, {"id": "dialog_positive", "text": "@got_it"}],
     "tap": {"id": "dialog_positive", "text": "@got_it"}},
))
MAX_DISMISSALS = 4
"""How often one kind of interruption is tapped away before the runner stops treating it as
one (a dialog that does not go away is a screen the scenario must know)."""


# --------------------------------------------------------------------------- runner


@dataclass
class _Attempt:
    screen: str | None = None
    matched: str = ""


class ScenarioRunner:
    """Runs scenario steps on a phone; ``cancel`` is checked between steps and during waits.

    ``role`` is ``solo`` (one phone), ``caller`` or ``callee`` (two phones; ``peer`` names the
    other one); ``locale`` picks the table's strings (default: read from the phone);
    ``run_dir`` gets the last screen's dump when an action cannot be verified.
    :meth:`report` is the manifest's ``scenario`` record.
    """

    def __init__(self, link: DeviceLink, scenario: Scenario, *, seed: int = 0,
                 cancel: threading.Event | None = None, wait_scale: float = 1.0,
                 retry_delay: float = 0.3,
                 on_step: Callable[[int, int, str], None] | None = None,
                 role: str = "solo", peer: str | None = None, locale: str | None = None,
                 run_dir: Path | None = None, app_version: str | None = None,
                 table: Table | None = None, poll_s: float = 1.0,
                 on_event: Callable[[str], None] | None = None) -> None:
        if role not in ROLES:
            raise ConfigError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
        self.link = link
        self.sc = scenario
        self.rng = random.Random(seed)
        self.cancel = cancel or threading.Event()
        self.wait_scale = wait_scale
        self.retry_delay = retry_delay
        self.on_step = on_step
        self.on_event = on_event
        self.role = role
        self.peer = peer
        self._locale = locale
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.app_version = app_version
        self._table = table
        self.poll_s = poll_s
        self.log: list[dict[str, Any]] = []
        self.steps_report: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.values: dict[str, str] = dict(scenario.params)
        self.last_xml: str = ""
        self.last_screen: str | None = None
        self.interruptions: list[str] = []
        self._dismissed: dict[str, int] = {}
        self._resolver: Resolver | None = None
        self._state: str = "not run"
        self._reason: str | None = None
        self._cur = _Attempt()

    # -- context ---------------------------------------------------------------------------
    @property
    def table(self) -> Table | None:
        if self._table is None:
            try:
                self._table = load_table()
            except ConfigError:
                return None
        return self._table

    @property
    def locale(self) -> str:
        if self._locale is None:
            try:
                self._locale = read_locale(self.link) or "en"
            except DeviceError:
                self._locale = "en"
        return self._locale

    @property
    def resolver(self) -> Resolver:
        if self._resolver is None:
            t = self.table
            if t is not None and self.sc.table_app in t.apps and language(self.locale) not in t.locales:
                raise ScenarioFailed(f"{self.link.serial}: {check_locale(self.locale, self.sc.table_app, t)}")
            self._resolver = Resolver(t, self.sc.table_app, self.locale)
        return self._resolver

    # -- running -----------------------------------------------------------------------------
    def run(self, steps: list[Step]) -> None:
        if steps and steps[0].params:
            self.values = {**self.sc.params, **steps[0].params}
        self._state = "running"
        try:
            for i, st in enumerate(steps):
                if self.cancel.is_set():
                    raise ScenarioCancelled("cancelled")
                if self.on_step:
                    self.on_step(i, len(steps), st.describe())
                t0 = time.time()
                self._cur = _Attempt(self.last_screen)
                entry = {"n": i + 1, "step": st.describe(), "screen": None, "matched": "",
                         "ok": False}
                self.steps_report.append(entry)
                detail = getattr(self, f"_do_{st.kind}")(st.args)
                entry.update(screen=self._cur.screen, matched=self._cur.matched or detail,
                             ok=True)
                self.log.append({"index": i, "step": st.describe(), "at": t0,
                                 "took_s": round(time.time() - t0, 3), "detail": detail})
        except ScenarioCancelled:
            self._state, self._reason = "cancelled", "cancelled"
            self._fail_entry()
            raise
        except ControllerError as err:
            self._state, self._reason = "failed", err.one_line()
            self._fail_entry()
            self._save_last_screen()
            raise
        except BaseException as err:
            self._state, self._reason = "failed", f"{type(err).__name__}: {err}"
            self._fail_entry()
            raise
        self._state = "done"

    def _fail_entry(self) -> None:
        if self.steps_report and not self.steps_report[-1]["ok"]:
            e = self.steps_report[-1]
            e.update(screen=self._cur.screen, matched=self._cur.matched)

    def _save_last_screen(self) -> None:
        if self.run_dir is None:
            return
        xml = self.last_xml
        if not xml:
            try:
                xml = self._raw_dump()
            except ControllerError:
                xml = ""
        if not xml:
            return
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / LAST_SCREEN_FILE).write_text(xml, encoding="utf-8")
            self.notes.append(f"last screen saved in {LAST_SCREEN_FILE}")
        except OSError:
            pass

    def report(self) -> dict[str, Any]:
        """``{verified, role, peer, app_version, locale, steps, reason?}`` for the manifest."""
        if self.app_version is None:
            try:
                self.app_version = read_app_version(self.link, self.sc.package)
            except ControllerError:
                self.app_version = None
        out: dict[str, Any] = {
            "verified": self._state == "done" and all(s["ok"] for s in self.steps_report),
            "role": self.role, "peer": self.peer, "app_version": self.app_version,
            "locale": self._locale, "steps": [dict(s) for s in self.steps_report]}
        if self._state != "done":
            out["reason"] = self._reason or self._state
        if self.interruptions:
            out["interruptions"] = list(self.interruptions)
        if self.notes:
            out["notes"] = list(self.notes)
        return out

    # -- device ------------------------------------------------------------------------------
    def _sh(self, cmd: str, what: str, timeout: float = 30) -> str:
        r = self.link.shell(cmd, timeout=timeout)
        if not r.ok:
            raise ScenarioFailed(f"{self.link.serial}: {what}: exit {r.returncode}: "
                                 f"{(r.stderr or r.stdout).strip()[:200]}")
        return r.stdout

    def _raw_dump(self) -> str:
        r = self.link.shell("uiautomator dump /sdcard/window_dump.xml >/dev/null 2>&1; "
                            "cat /sdcard/window_dump.xml", timeout=30)
        return r.stdout

    def dump(self) -> Screen | None:
        """The current screen, or None when uiautomator could not get an idle state."""
        text = self._raw_dump()
        if "could not get idle state" in text or "<hierarchy" not in text:
            return None
        self.last_xml = text
        return parse_screen(text)

    def screen_name(self, nodes: list[Node]) -> str | None:
        name = recognise(self.sc, nodes, self.resolver, self.values)
        self.last_screen = name
        self._cur.screen = name
        return name

    def _dismiss(self, nodes: list[Node]) -> str | None:
        """Tap away one known interruption on screen; its name, or None."""
        for it in (*self.sc.interruptions, *_SYSTEM_INTERRUPTIONS):
            if self._dismissed.get(it.name, 0) >= MAX_DISMISSALS:
                continue
            try:
                if not all(self.resolver.find(nodes, w) for w in it.when):
                    continue
                n = self.resolver.find(nodes, it.tap)
            except ScenarioFailed:
                continue  # a string the table lacks in this language: not this one
            if n is None:
                continue
            x, y = n.center
            self._sh(f"input tap {x} {y}", f"dismiss {it.name}")
            self.interruptions.append(it.name)
            self._dismissed[it.name] = self._dismissed.get(it.name, 0) + 1
            if self.on_event:
                self.on_event(f"dismissed {it.name}")
            return it.name
        return None

    def _observe(self, dismiss: bool = True) -> tuple[Screen | None, str | None]:
        """One look at the screen: dump, dismiss an interruption (and look again), name it."""
        for _ in range(4):
            nodes = self.dump()
            if nodes is None:
                return None, None
            if dismiss and self._dismiss(nodes):
                self._sleep(self.retry_delay)
                continue
            name = self.screen_name(nodes)
            if name is not None:  # the app is back: interruptions may come again
                self._dismissed.clear()
            return nodes, name
        return None, None

    def _locate(self, sel: Selector, retries: int) -> Node | None:
        for attempt in range(retries + 1):
            nodes, _ = self._observe()
            if nodes is not None:
                n = self.resolver.find(nodes, sel)
                if n is not None:
                    return n
            if attempt < retries:
                self._sleep(self.retry_delay)
        return None

    def _fill(self, sel: Selector) -> Selector:
        return _fill(sel, self.values, "selector")

    def _tap_node(self, n: Node, long: bool = False) -> str:
        x, y = n.center
        if long:
            self._sh(f"input swipe {x} {y} {x} {y} 800", "long tap")
        else:
            self._sh(f"input tap {x} {y}", "tap")
        self._cur.matched = n.describe()
        return f"tapped {x},{y}"

    # -- plain steps -------------------------------------------------------------------------
    def _do_launch(self, a: Launch) -> str:
        comp = f"{self.sc.package}/{a.activity or self.sc.activity}"
        out = self._sh(f"am start -W -n {shlex.quote(comp)}", f"launch {comp}")
        if "Error" in out and "Warning" not in out:
            raise ScenarioFailed(f"{self.link.serial}: launch {comp}: {out.strip().splitlines()[-1]}",
                                 hint="is the app installed?")
        m = re.search(r"TotalTime: (\d+)", out)
        return f"TotalTime {m.group(1)} ms" if m else "started"

    def _do_view(self, a: View) -> str:
        out = self._sh(f"am start -W -a android.intent.action.VIEW -d {shlex.quote(a.uri)} "
                       f"-p {shlex.quote(self.sc.package)}", f"open {a.uri}")
        if "Error" in out and "Warning" not in out:
            raise ScenarioFailed(f"{self.link.serial}: open {a.uri}: "
                                 f"{out.strip().splitlines()[-1]}")
        return "opened"

    def _do_tap(self, a: Tap) -> str:
        n = self._locate(a, 0 if a.optional else a.retries)
        if n is None and a.optional:
            return "not on screen; skipped"
        if n is None:
            raise ScenarioFailed(f"{self.link.serial}: no node with {a.describe()} on screen "
                                 f"({self._where()})",
                                 hint="check the selector with `flowtruth scenario probe`")
        return self._tap_node(n, a.long)

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
                nodes, _ = self._observe()
                if nodes is not None and self.resolver.find(nodes, a) is None:
                    return "absent"
                self._sleep(self.retry_delay)
            raise ScenarioFailed(f"{self.link.serial}: {a.describe()} is still on screen")
        n = self._locate(a, a.retries)
        if n is None:
            raise ScenarioFailed(f"{self.link.serial}: expected {a.describe()} on screen "
                                 f"({self._where()})")
        self._cur.matched = n.describe()
        return "present"

    def _do_stop(self, a: Stop) -> str:
        self._sh(f"am force-stop {shlex.quote(self.sc.package)}", "force-stop")
        return "stopped"

    def _sleep(self, s: float) -> None:
        if self.cancel.wait(max(0.0, s)):
            raise ScenarioCancelled("cancelled")

    def _where(self) -> str:
        return f"screen: {self.last_screen or 'unknown'}"

    # -- screens -----------------------------------------------------------------------------
    def _context_ok(self, screen: str, nodes: list[Node]) -> bool:
        ctx = self.sc.screens[screen].context
        return ctx is None or self.resolver.find(nodes, self._fill(ctx)) is not None

    def _edges(self) -> list[tuple[str, str, tuple[Step, ...] | None]]:
        out: list[tuple[str, str, tuple[Step, ...] | None]] = [
            (f, t, steps) for f, t, steps in self.sc.moves]
        for name, s in self.sc.screens.items():
            if s.parent:
                out.append((name, s.parent, None))  # BACK
        return out

    def _path(self, cur: str, target: str, failed: set[int]) -> int | None:
        """Index (in :meth:`_edges`) of the first move on a shortest path, or None."""
        edges = self._edges()
        first: dict[str, int | None] = {cur: None}
        q = deque([cur])
        while q:
            s = q.popleft()
            for i, (f, t, _steps) in enumerate(edges):
                if i in failed or (f != s and f != "*") or t in first:
                    continue
                first[t] = first[s] if first[s] is not None else i
                if t == target:
                    return first[t]
                q.append(t)
        return None

    def _relaunch(self, force: bool) -> None:
        if force:
            self._sh(f"am force-stop {shlex.quote(self.sc.package)}", "force-stop")
        self._do_launch(Launch())
        self._sleep(self.retry_delay)

    def _back(self) -> None:
        self._sh("input keyevent KEYCODE_BACK", "back")
        self._sleep(self.retry_delay)

    def goto(self, target: str, timeout: float = 60.0) -> str:
        """Reach ``target`` from wherever the app is; a description of the way."""
        deadline = time.monotonic() + timeout
        failed: set[int] = set()
        way: list[str] = []
        unknown = relaunches = stuck = busy = 0
        edges = self._edges()
        last: tuple[str | None, str] | None = None
        while time.monotonic() < deadline and len(way) < 24:
            nodes, cur = self._observe()
            if nodes is None:
                busy += 1
                self._sleep(self.retry_delay)
                continue
            if cur == target and self._context_ok(target, nodes):
                return " > ".join(way) or "already there"
            sig = (cur, self.last_xml)
            stuck = stuck + 1 if sig == last else 0
            last = sig
            if stuck >= 2:  # the last moves changed nothing: start the app afresh
                if relaunches >= 3:
                    break
                self._relaunch(force=True)
                way.append("relaunch")
                relaunches += 1
                stuck, last = 0, None
                continue
            in_app = any(n.package == self.sc.package for n in nodes)
            if cur is None:
                if not in_app or unknown >= 2:
                    if relaunches >= 3:
                        break
                    self._relaunch(force=relaunches > 0)
                    way.append("relaunch" if relaunches else "launch")
                    relaunches += 1
                    unknown = 0
                else:
                    self._back()
                    way.append("back")
                    unknown += 1
                continue
            unknown = 0
            src = cur
            if cur == target or not self._context_ok(cur, nodes):
                # the right screen with the wrong chat, or a way through the wrong chat: leave it
                parent = self.sc.screens[cur].parent
                if parent is None:
                    self._relaunch(force=True)
                    way.append("relaunch")
                    relaunches += 1
                    continue
                self._back()
                way.append("back")
                continue
            i = self._path(src, target, failed)
            if i is None:
                if self.sc.screens[cur].parent:
                    self._back()
                    way.append("back")
                else:
                    if relaunches >= 3:
                        break
                    self._relaunch(force=True)
                    way.append("relaunch")
                    relaunches += 1
                    failed.clear()
                continue
            f, t, steps = edges[i]
            if steps is None:
                self._back()
                way.append("back")
                continue
            try:
                for st in steps:
                    args = _fill(st.args, self.values, f"moves {f}->{t}")
                    if isinstance(args, Tap):
                        args = args.model_copy(update={"retries": min(args.retries, 3)})
                    getattr(self, f"_do_{st.kind}")(args)
                way.append(f"{cur}->{t}")
            except ScenarioFailed:
                failed.add(i)
                way.append(f"{cur}->{t} failed")
        raise ScenarioFailed(f"{self.link.serial}: cannot reach the {target} screen "
                             f"(last screen: {self.last_screen or 'unknown'}; tried: "
                             f"{' > '.join(way[-8:]) or 'nothing'}"
                             + (f"; uiautomator found no idle screen {busy} times" if busy else "")
                             + f"; {timeout:g} s)",
                             hint="look at the screen with `flowtruth scenario probe`")

    def _do_goto(self, a: Goto) -> str:
        return self.goto(a.screen, float(a.timeout))

    def _poll(self, what: str, timeout: float, check: Callable[[Screen, str | None], str | None],
              fail: Callable[[], str]) -> str:
        deadline = time.monotonic() + timeout
        while True:
            nodes, cur = self._observe()
            if nodes is not None:
                got = check(nodes, cur)
                if got is not None:
                    return got
            if time.monotonic() >= deadline:
                raise ScenarioFailed(f"{self.link.serial}: {fail()}")
            self._sleep(min(self.poll_s, max(0.0, deadline - time.monotonic())))

    def _do_await(self, a: Await) -> str:
        t = float(a.timeout)
        return self._poll(
            "await", t, lambda nodes, cur: f"on {cur}" if cur in a.screens else None,
            lambda: f"the {' or '.join(a.screens)} screen did not come within {t:g} s "
                    f"(last screen: {self.last_screen or 'unknown'})"
                    + (f"; did {self.peer} call?" if "incoming_call" in a.screens and self.peer
                       else ""))

    # -- verified actions --------------------------------------------------------------------
    def _bubble(self, text: str) -> Selector:
        b = self.sc.verify.bubble
        assert b is not None
        return b.model_copy(update={"text_contains": text})

    def _do_sent(self, a: Sent) -> str:
        t = float(a.timeout)
        sent = self.sc.verify.sent
        state = {"seen": False}
        if not a.text:  # media: the newest sent state on screen
            if sent is None:
                return "this app shows no sent state"

            def newest(nodes: Screen, _cur: str | None) -> str | None:
                got = self.resolver.find_all(nodes, sent)
                if not got:
                    return None
                n = nodes[got[-1]]
                self._cur.matched = n.describe()
                return f"sent ({n.content_desc or n.text})"

            return self._poll("sent", t, newest, lambda: (
                f"no message reached the sent state within {t:g} s ({self._where()})"))
        bubble = self._bubble(a.text)

        def check(nodes: Screen, _cur: str | None) -> str | None:
            hits = self.resolver.find_all(nodes, bubble)
            if not hits:
                return None
            state["seen"] = True
            if sent is None:
                self._cur.matched = nodes[hits[-1]].describe()
                return "on screen (this app shows no sent state)"
            for i in reversed(hits):  # the newest (lowest) bubble first
                for lv in range(self.sc.verify.row_levels + 1):
                    anc = ancestor(nodes, i, lv)
                    got = self.resolver.find_all(nodes, sent, subtree(nodes, anc))
                    if got:
                        n = nodes[got[0]]
                        self._cur.matched = n.describe()
                        return f"sent ({n.content_desc or n.text})"
            return None

        return self._poll("sent", t, check, lambda: (
            f"the message {a.text!r} did not reach the sent state within {t:g} s"
            if state["seen"] else f"the message {a.text!r} is not on screen after {t:g} s")
            + f" ({self._where()})")

    def _do_received(self, a: Received) -> str:
        t = float(a.timeout)
        bubble = self._bubble(a.text)

        def check(nodes: Screen, _cur: str | None) -> str | None:
            n = self.resolver.find(nodes, bubble)
            if n is None:
                return None
            self._cur.matched = n.describe()
            return "received"

        return self._poll("received", t, check, lambda: (
            f"no message {a.text!r} from {self.peer or 'the peer'} within {t:g} s "
            f"({self._where()})"))

    def _do_connected(self, a: Connected) -> str:
        t = float(a.timeout)

        def check(nodes: Screen, cur: str | None) -> str | None:
            if cur != "in_call":
                return None
            timer = Selector(text=TIMER_RE)
            n = self.resolver.find(nodes, timer)
            self._cur.matched = n.describe() if n else "in_call"
            return "connected" + (f" ({n.text})" if n else "")

        return self._poll("connected", t, check, lambda: (
            f"the call was not connected within {t:g} s (last screen: "
            f"{self.last_screen or 'unknown'})"
            + ("; nobody answers a solo call" if self.role == "solo" else
               f"; did {self.peer or 'the peer'} answer?" if self.role == "caller" else "")))

    def _do_placed(self, a: Placed) -> str:
        t = float(a.timeout)
        ok = ("outgoing_call", "in_call")

        def check(_nodes: Screen, cur: str | None) -> str | None:
            if cur in ok:
                if cur == "outgoing_call" and self.role == "solo":
                    self.notes.append("solo call: placed and ringing, not answered (no peer)")
                return f"on {cur}"
            return None

        return self._poll("placed", t, check, lambda: (
            f"the call screen did not come within {t:g} s (last screen: "
            f"{self.last_screen or 'unknown'})"))

    def _do_hangup(self, a: Hangup) -> str:
        sel = self.sc.verify.hangup
        calls = self.sc.verify.call_screens
        for _ in range(3):
            nodes, cur = self._observe()
            if nodes is None:
                self._sleep(self.retry_delay)
                continue
            if cur not in calls:
                self.notes.append("the call had already ended (by the peer)")
                return "the call had already ended"
            n = self.resolver.find(nodes, sel) if sel else None
            if n is None:
                self._sleep(self.retry_delay)
                continue
            self._tap_node(n)
            self._sleep(self.retry_delay)
            return "hung up"
        raise ScenarioFailed(f"{self.link.serial}: cannot hang up: no "
                             f"{sel.describe() if sel else 'verify.hangup selector'} on the call "
                             f"screen ({self._where()})")
