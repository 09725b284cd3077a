"""The run manifest as labelling reads it: what the session engine must write.

A run directory made by the session engine looks like::

    runs/<utc-stamp>_<device>_<package>/
        manifest.json        this file (below)
        capture.pcap         or rotated capture files (capture_00001.pcap, ...)
        strace/              strace.<pid>.<procname>.log, one per traced process
        netstat.log          the netstat poller's log (optional)
        frida.jsonl          the frida agent's events (optional)
        packages.txt         output of ``pm list packages -U`` (optional)

``manifest.json`` (UTF-8 JSON object; keys not listed here are allowed and ignored by
labelling, e.g. tool versions and artifact checksums)::

    {
      "schema_version": 1,
      "device": {"serial": "R58M...", "model": "Pixel 7", "manufacturer": "Google",
                 "mac": "38:a4:ed:18:cc:bf", "ip": "192.168.77.10"},
      "apps": [{"package": "org.thoughtcrime.securesms", "uid": 10123,
                "version": "7.1.2"}],
      "activity": "chat",                      # or null
      "scenario": {"role": "caller",           # solo | caller | callee (optional)
                   "peer": "phone2"},          # the paired phone (or null)
      "clock": {"offset_s": 0.0123,            # phone minus AP, seconds
                "uncertainty_s": 0.002},       # or null
      "capture": {"files": ["capture.pcap"],   # in capture order (rotation)
                  "interface": "wlan1", "snaplen": 262144},
      "traces": {"strace": ["strace/strace.4321.org.thoughtcrime.securesms.log"],
                 "netstat": "netstat.log",     # or null
                 "frida": "frida.jsonl",       # or null
                 "packages": "packages.txt"},  # or null
      "started_at": "2026-11-28T21:04:05Z",    # ISO 8601, UTC
      "outcome": "completed"                   # completed | stopped | failed | ...
    }

File names are relative to the run directory (absolute ones are used as given); an
``strace`` entry may also name a directory of launcher logs. ``apps[0]`` is the run's
target app (it names the MIRAGE file); every app listed is a target.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from analysis.errors import BadInputError, ParseError, SchemaError

MANIFEST_NAME = "manifest.json"
SCHEMA_VERSION = 1


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class DeviceInfo(_Model):
    """The phone the run captured."""

    serial: str | None = None
    """adb serial number."""
    model: str | None = None
    """``ro.product.model``; names the MIRAGE device folder."""
    manufacturer: str | None = None
    """``ro.product.manufacturer``."""
    mac: str | None = None
    """Wi-Fi MAC as the AP saw it; names the MIRAGE device folder and ``BF_device``."""
    ip: str | None = None
    """The phone's address on the AP's network: that side of a flow is the device."""


class AppInfo(_Model):
    """One app the run targeted."""

    package: str = Field(min_length=1)
    """Android package name, e.g. ``org.thoughtcrime.securesms``."""
    uid: int | None = None
    """The app's Linux uid on the phone (adds to the uid map)."""
    version: str | None = None
    """versionName (or code) of the installed app."""


class ClockInfo(_Model):
    """Phone clock minus AP clock, as the session measured it."""

    offset_s: float = 0.0
    """Seconds the phone runs ahead of the AP (negative when behind)."""
    uncertainty_s: float | None = None
    """Half-width of the measurement's uncertainty, seconds."""


class CaptureInfo(_Model):
    """The AP-side capture."""

    files: list[str] = Field(min_length=1)
    """Capture files in capture order (several when rotated)."""
    interface: str | None = None
    snaplen: int | None = None


class TraceFiles(_Model):
    """Phone-side socket traces pulled after the run."""

    strace: list[str] = Field(default_factory=list)
    """Launcher logs ``strace.<pid>.<procname>.log`` (or directories of them)."""
    netstat: str | None = None
    frida: str | None = None
    packages: str | None = None
    """``pm list packages -U`` output (the uid map)."""


class ScenarioInfo(_Model):
    role: str | None = None
    """``solo``, or in a pair ``caller``/``callee`` (MIRAGE 2022's ``BF_sublabel``)."""
    peer: str | None = None


class RunManifest(_Model):
    """The manifest fields labelling needs (see the module docstring)."""

    schema_version: int
    device: DeviceInfo = Field(default_factory=DeviceInfo)
    apps: list[AppInfo] = Field(default_factory=list)
    activity: str | None = None
    scenario: ScenarioInfo | None = None
    clock: ClockInfo = Field(default_factory=ClockInfo)
    capture: CaptureInfo
    traces: TraceFiles = Field(default_factory=TraceFiles)
    started_at: _dt.datetime | None = None
    outcome: str | None = None

    # Where the manifest was read from; relative file names resolve against it.
    run_dir: Path | None = Field(default=None, exclude=True)

    @field_validator("schema_version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        if v < 1 or v > SCHEMA_VERSION:
            raise ValueError(f"schema_version {v} is not supported (this flowtruth reads "
                             f"1..{SCHEMA_VERSION})")
        return v

    def path(self, name: str) -> Path:
        """A file named in the manifest, resolved against the run directory."""
        p = Path(name)
        if p.is_absolute() or self.run_dir is None:
            return p
        return self.run_dir / p

    @property
    def packages(self) -> list[str]:
        """The target packages, the run's app first."""
        return [a.package for a in self.apps]

    def uid_map(self) -> dict[int, tuple[str, ...]]:
        """uid -> packages of the apps the manifest names (a partial uid map)."""
        out: dict[int, set[str]] = {}
        for a in self.apps:
            if a.uid is not None:
                out.setdefault(a.uid, set()).add(a.package)
        return {u: tuple(sorted(p)) for u, p in out.items()}


def _where(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def load_manifest(run_dir_or_file: str | os.PathLike[str]) -> RunManifest:
    """Read and check ``manifest.json`` of a run directory (or the manifest file itself).

    Raises :class:`BadInputError` when it is missing, :class:`ParseError` when it is not
    JSON, :class:`SchemaError` naming the file and field when a field is wrong.
    """
    p = Path(run_dir_or_file)
    path = p / MANIFEST_NAME if p.is_dir() else p
    if not p.exists():
        raise BadInputError(f"{p}: no such run directory")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BadInputError(f"{path}: no such file",
                            "give a run directory made by the session engine, or label a "
                            "capture offline with --pcap/--strace") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ParseError(path, None, f"cannot read: {getattr(err, 'strerror', None) or err}"
                         ) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ParseError(path, f"line {err.lineno} column {err.colno}",
                         f"not JSON: {err.msg}") from None
    except RecursionError:
        raise ParseError(path, None, "not a manifest: JSON nested too deeply") from None
    except ValueError as err:  # an integer of more digits than Python converts
        raise ParseError(path, None, f"not a manifest: {str(err).splitlines()[0][:120]}"
                         ) from None
    if not isinstance(data, dict):
        raise SchemaError(f"{path}: the manifest must be a JSON object, not "
                          f"{type(data).__name__}")
    if "schema_version" not in data:
        raise SchemaError(f"{path}: field schema_version is missing")
    try:
        m = RunManifest.model_validate(data)
    except ValidationError as err:
        e = err.errors()[0]
        more = f" (and {len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
        raise SchemaError(f"{path}: field {_where(e['loc'])}: {e['msg']}{more}") from None
    return m.model_copy(update={"run_dir": path.parent})
