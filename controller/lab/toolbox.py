"""A virtual phone's identity (``PhoneConfig``) and its Android-like shell (``Toolbox``).

The toolbox prepares a phone's state directory::

    state.json            props, packages, running apps, foreground app, screens, settings,
                          battery, clock offset (read and written by the shims and the lab's
                          simulated apps; see ``toolbox_runtime``)
    input_events.jsonl    one line per ``input`` command
    logcat.txt            what ``logcat`` prints (simulated apps may append lines)
    bin/                  generated shims: getprop, pm, am, input, uiautomator, dumpsys, ...
    fs/data/local/tmp     the phone's /data (so also /data/local/tmp)
    fs/storage/emulated/0 the phone's /sdcard
    enter.sh, rootfs/     set up the phone's private mount namespace
    run.sh                runs one command line with ``sh -c`` and kills its process group
                          if adbd dies

and turns a shell command line into the argv that runs it: a real ``/bin/sh -c`` whose
PATH starts with ``bin/``, inside the phone's network namespace when one is given.

When the host process is root, commands run in a private mount namespace whose root is
a tmpfs of bind mounts of the host's top-level directories plus the phone's ``/data``,
``/sdcard`` and ``/storage``, so device paths work exactly as on Android.  ``start()``
builds that namespace once (``unshare -m``, held by a sleeping process) and commands
join it with ``nsenter``; without ``start()`` each command builds its own.

Without root there is no mount namespace: the sync service still maps those paths into
``fs/``, the toolbox shims map them too, and the command line itself gets its
``/data/local/tmp``, ``/sdcard`` and ``/storage/emulated/0`` prefixes rewritten (best
effort: a path built at run time by the command escapes the rewriting).  Setting
``FLOWTRUTH_LAB_MOUNTNS=0`` selects this fallback as root too.  A network namespace
always needs root and raises ``RootRequired`` without it.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError

from controller.errors import ConfigError, LabError, RootRequired
from controller.lab import toolbox_runtime as rt

REPO_ROOT = Path(__file__).resolve().parents[2]


def die_with_parent() -> None:
    """In a child process: get SIGTERM when the parent thread dies (PR_SET_PDEATHSIG)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


class PackageInfo(BaseModel):
    """One installed app as the package manager reports it."""

    uid: int = Field(description="Linux uid of the app (10000 + app id for apps).")
    version_code: int = Field(default=1, description="versionCode from the manifest.")
    version_name: str = Field(default="1.0", description="versionName from the manifest.")
    label: str = Field(default="", description="The launcher label, shown on the app's screen.")
    activity: str | None = Field(
        default=None, description="Fully qualified launcher activity (None: not launchable)."
    )
    system: bool = Field(default=False, description="Part of the system image (pm list -s).")
    input_method: str | None = Field(
        default=None,
        description="Fully qualified class of the package's input method service, if it is a "
        "keyboard (``ime list -a`` shows it as package/.Class).",
    )


ADB_KEYBOARD = PackageInfo(
    uid=10311,
    version_code=20,
    version_name="2.0",
    label="ADB Keyboard",
    input_method="com.android.adbkeyboard.AdbIME",
)
"""ADBKeyBoard (github.com/senzhk/ADBKeyBoard): the IME that types any Unicode text sent
with ``am broadcast -a ADB_INPUT_B64 --es msg BASE64``."""


class PhoneConfig(BaseModel):
    """The identity of one virtual phone: what getprop, pm and the adb banner report."""

    serial: str = Field(description="ro.serialno, the phone's hardware serial.")
    model: str = Field(description="ro.product.model, e.g. SM-S936B.")
    manufacturer: str = Field(description="ro.product.manufacturer, e.g. samsung.")
    brand: str = Field(default="", description="ro.product.brand (defaults to the manufacturer).")
    product_name: str = Field(description="ro.product.name, e.g. o1sxeea.")
    device: str = Field(description="ro.product.device, e.g. o1s.")
    android_release: str = Field(description="ro.build.version.release, e.g. 14.")
    sdk: int = Field(description="ro.build.version.sdk, e.g. 34.")
    abi: str = Field(default="arm64-v8a", description="ro.product.cpu.abi.")
    fingerprint: str = Field(description="ro.build.fingerprint.")
    security_patch: str = Field(
        default="2024-05-01", description="ro.build.version.security_patch."
    )
    clock_offset_s: float = Field(
        default=0.0, description="Seconds the phone's clock runs ahead (+) or behind (-) the host."
    )
    packages: dict[str, PackageInfo] = Field(default_factory=dict, description="Installed apps.")
    battery_level: int = Field(default=80, ge=0, le=100, description="Battery level in percent.")
    display_width: int = Field(default=1080, description="Screen width in pixels.")
    display_height: int = Field(default=2400, description="Screen height in pixels.")
    timezone: str = Field(default="Europe/Rome", description="persist.sys.timezone.")
    locale: str = Field(default="en-US", description="persist.sys.locale: the apps' language.")
    interruption_rate: float = Field(
        default=0.03, ge=0, le=1, description="Lab apps: chance per action of a permission "
        "prompt or rating dialog on top (0: never).",
    )  # fmt: skip
    extra_props: dict[str, str] = Field(default_factory=dict, description="More getprop values.")
    adb_keyboard: bool = Field(
        default=True,
        description="ADBKeyBoard (com.android.adbkeyboard) is installed, as on a phone prepared "
        "for flowtruth (installed, not enabled); False: a phone without it.",
    )
    strace_fault: Literal["none", "selinux", "ptrace"] = Field(
        default="none",
        description="Failure of strace on this phone, as on real ones: selinux: attaches, then "
        "wait4(__WALL) is denied (Magisk issue 596); ptrace: PTRACE_SEIZE/ATTACH refused "
        "(a vendor's ptrace block). Real kernel errors: a seccomp filter on everything su runs.",
    )
    crlf_output: bool = Field(
        default=False,
        description="Shell output ends lines with CRLF, as through old adbd without shell v2.",
    )
    hostile_process: Literal["none", "long", "newline"] = Field(
        default="none",
        description="Each simulated app also runs a process named PACKAGE:<300 characters> "
        "(long) or PACKAGE:<a name with a newline> (newline).",
    )

    def faults(self) -> dict[str, Any]:
        """The failure modes the toolbox, adbd and the simulated apps act on."""
        return {"strace": self.strace_fault, "crlf": self.crlf_output,
                "hostile_process": self.hostile_process}

    def all_packages(self) -> dict[str, PackageInfo]:
        """The installed packages: ``packages`` plus ADBKeyBoard when ``adb_keyboard``."""
        extra = {rt.ADB_KEYBOARD_PACKAGE: ADB_KEYBOARD} if self.adb_keyboard else {}
        return {**extra, **self.packages}

    def default_input_method(self) -> str:
        """The IME a fresh phone selects: its first system keyboard ('' when it has none)."""
        for name, info in sorted(self.all_packages().items()):
            if info.system and info.input_method:
                return rt.short_component(name, info.input_method)
        return ""

    def props(self) -> dict[str, str]:
        """Every system property the phone's getprop reports."""
        brand = self.brand or self.manufacturer
        props = {
            "ro.serialno": self.serial,
            "ro.boot.serialno": self.serial,
            "ro.product.model": self.model,
            "ro.product.manufacturer": self.manufacturer,
            "ro.product.brand": brand,
            "ro.product.name": self.product_name,
            "ro.product.device": self.device,
            "ro.product.board": self.device,
            "ro.product.system.model": self.model,
            "ro.product.vendor.model": self.model,
            "ro.build.version.release": self.android_release,
            "ro.build.version.sdk": str(self.sdk),
            "ro.build.version.security_patch": self.security_patch,
            "ro.build.fingerprint": self.fingerprint,
            "ro.build.type": "user",
            "ro.build.tags": "release-keys",
            "ro.build.id": self.fingerprint.split("/")[3]
            if self.fingerprint.count("/") >= 4
            else "",
            "ro.product.cpu.abi": self.abi,
            "ro.product.cpu.abilist": f"{self.abi},armeabi-v7a,armeabi"
            if self.abi == "arm64-v8a"
            else self.abi,
            "ro.product.cpu.abilist64": self.abi if "64" in self.abi else "",
            "ro.debuggable": "0",
            "ro.secure": "1",
            "ro.adb.secure": "0",
            "ro.boot.verifiedbootstate": "orange",
            "ro.hardware": self.device,
            "persist.sys.timezone": self.timezone,
            "persist.sys.locale": self.locale,
            "ro.product.locale": "en-US",
            "persist.sys.usb.config": "mtp,adb",
            "sys.boot_completed": "1",
            "dev.bootcomplete": "1",
            "init.svc.adbd": "running",
            "service.adb.tcp.port": "5555",
            "gsm.operator.alpha": "",
            "wifi.interface": "wlan0",
        }
        props.update(self.extra_props)
        # the phone's language is the lab's setting (the apps' texts follow it), not the dump's
        props["persist.sys.locale"] = self.locale
        return props

    def banner(self, features: list[str]) -> str:
        """The CNXN banner adbd sends: ``device::ro.product.name=...;...;features=...``."""
        return (
            f"device::ro.product.name={self.product_name};ro.product.model={self.model};"
            f"ro.product.device={self.device};features={','.join(features)}"
        )

    def initial_state(self) -> dict[str, Any]:
        """The state file of a freshly booted phone with this identity."""
        return {
            "schema_version": rt.SCHEMA_VERSION,
            "serial": self.serial,
            "props": self.props(),
            "packages": {name: p.model_dump() for name, p in sorted(self.all_packages().items())},
            "running": {},
            "foreground": None,
            "screens": {},
            "settings": {
                "global": {
                    "adb_enabled": "1",
                    "airplane_mode_on": "0",
                    "wifi_on": "1",
                    "stay_on_while_plugged_in": "0",
                    "auto_time": "0",
                },
                "secure": {
                    "android_id": hashlib.sha256(self.serial.encode()).hexdigest()[:16],
                    "default_input_method": self.default_input_method(),
                    "enabled_input_methods": self.default_input_method(),
                },
                "system": {
                    "screen_brightness": "128",
                    "screen_brightness_mode": "0",
                    "screen_off_timeout": "600000",
                },
            },
            "battery": {
                "level": self.battery_level,
                "usb_powered": True,
                "ac_powered": False,
                "status": 2,
            },
            "display": {"width": self.display_width, "height": self.display_height, "density": 420},
            "clock_offset_s": self.clock_offset_s,
            "faults": self.faults(),
            "next_pid": 21000 + (sum(self.serial.encode()) % 500) * 7,
        }


def _messengers(uids: dict[str, int], keyboard: tuple[str, str]) -> dict[str, PackageInfo]:
    kb_package, kb_service = keyboard
    system = {
        kb_package: PackageInfo(
            uid=uids["keyboard"],
            version_code=1,
            version_name="1.0",
            system=True,
            label="Keyboard",
            input_method=kb_service,
        ),
        "android": PackageInfo(
            uid=1000, version_code=34, version_name="14", system=True, label="Android System"
        ),
        "com.android.shell": PackageInfo(
            uid=2000, version_code=34, version_name="14", system=True, label="Shell"
        ),
        "com.android.systemui": PackageInfo(
            uid=10146, version_code=34, version_name="14", system=True, label="System UI"
        ),
    }
    apps = {
        "org.thoughtcrime.securesms": PackageInfo(
            uid=uids["signal"],
            version_code=1413,
            version_name="7.8.1",
            label="Signal",
            activity="org.thoughtcrime.securesms.RoutingActivity",
        ),
        "org.telegram.messenger": PackageInfo(
            uid=uids["telegram"],
            version_code=47362,
            version_name="10.13.4",
            label="Telegram",
            activity="org.telegram.ui.LaunchActivity",
        ),
        "com.whatsapp": PackageInfo(
            uid=uids["whatsapp"],
            version_code=241175001,
            version_name="2.24.11.75",
            label="WhatsApp",
            activity="com.whatsapp.home.ui.HomeActivity",
        ),
        "com.google.android.gms": PackageInfo(
            uid=uids["gms"],
            version_code=241915038,
            version_name="24.19.15",
            system=True,
            label="Google Play services",
        ),
        "com.android.chrome": PackageInfo(
            uid=uids["chrome"],
            version_code=636717833,
            version_name="124.0.6367.178",
            system=True,
            label="Chrome",
            activity="com.google.android.apps.chrome.Main",
        ),
    }
    return {**system, **apps}


SAMSUNG_KEYBOARD = (
    "com.samsung.android.honeyboard",
    "com.samsung.android.honeyboard.service.HoneyBoardService",
)
GBOARD = ("com.google.android.inputmethod.latin", "com.android.inputmethod.latin.LatinIME")


# Identity properties of two real phones, from their getprop dumps (../shared/data/
# android_real: getprop_samsung_RootMyGalaxy.txt, getprop_xiaomi_peridot.txt).
SAMSUNG_S936B_PROPS = {
    "ro.product.brand": "samsung",
    "ro.product.board": "sun",
    "ro.hardware": "qcom",
    "ro.boot.hardware": "qcom",
    "ro.build.id": "BP4A.251205.006",
    "ro.build.display.id": "BP4A.251205.006.S936BXXUACZF1",
    "ro.build.version.incremental": "S936BXXUACZF1",
    "ro.build.version.codename": "REL",
    "ro.build.characteristics": "phone",
    "ro.product.first_api_level": "35",
    "ro.soc.manufacturer": "QTI",
    "ro.soc.model": "SM8750",
    "ro.sf.lcd_density": "450",
    "ro.csc.sales_code": "EUX",
    "ro.crypto.state": "encrypted",
    "gsm.operator.alpha": "Movistar,simyo",
    "persist.sys.locale": "es-ES",
    "ro.product.locale": "en-GB",
    # a value over several lines, as getprop prints it
    "persist.sys.boot.reason.history": "reboot,1784638255\nreboot,userrequested,1784637108\n"
    "reboot,lpm,1784545284",
}
XIAOMI_PERIDOT_PROPS = {
    "ro.product.brand": "POCO",
    "ro.product.board": "pineapple",
    "ro.product.marketname": "POCO F6",
    "ro.hardware": "qcom",
    "ro.boot.hardware": "qcom",
    "ro.build.id": "BP1A.250405.007",
    "ro.build.display.id": "lineage_peridot-userdebug 15 BP1A.250405.007 611 release-keys",
    "ro.build.version.incremental": "611",
    "ro.build.version.codename": "REL",
    "ro.build.characteristics": "default",
    "ro.product.first_api_level": "34",
    "ro.soc.manufacturer": "QTI",
    "ro.soc.model": "SM8635",
    "ro.sf.lcd_density": "480",
    "ro.crypto.state": "encrypted",
    "gsm.operator.alpha": "JIO 4G,Vi India",
    "persist.sys.locale": "en-IN",
    "ro.product.locale": "en-US",
    "persist.sys.boot.reason.history": "reboot,,1745935181\nshutdown,userrequested,1745815614\n"
    "reboot,,1745768086\nreboot,,1745686927",
}


def samsung_s936b(serial: str = "R5CY743GDFY", clock_offset_s: float = 2.375,
                  locale: str | None = None) -> PhoneConfig:
    """A Samsung Galaxy S25+ (SM-S936B, Android 16, arm64-v8a) as its real getprop dump
    shows it, with the three messengers."""
    return PhoneConfig(
        serial=serial,
        model="SM-S936B",
        manufacturer="samsung",
        brand="samsung",
        product_name="pa2qxeea",
        device="pa2q",
        android_release="16",
        sdk=36,
        fingerprint="samsung/pa2qxeea/pa2q:16/BP4A.251205.006/S936BXXUACZF1_OXMACZF1:user/"
        "release-keys",
        security_patch="2026-06-05",
        clock_offset_s=clock_offset_s,
        battery_level=87,
        display_width=1080,
        display_height=2400,
        timezone="Europe/Madrid",
        extra_props=dict(SAMSUNG_S936B_PROPS),
        locale=locale or SAMSUNG_S936B_PROPS["persist.sys.locale"],
        packages=_messengers(
            {
                "signal": 10263,
                "telegram": 10251,
                "whatsapp": 10234,
                "gms": 10141,
                "chrome": 10157,
                "keyboard": 10112,
            },
            SAMSUNG_KEYBOARD,
        ),
    )


def xiaomi_24069pc21i(serial: str = "f89a5ec6", clock_offset_s: float = -1.625,
                      locale: str | None = None) -> PhoneConfig:
    """A Xiaomi POCO F6 (24069PC21I "peridot", Android 15, arm64-v8a) as its real getprop
    dump shows it, with the three messengers."""
    return PhoneConfig(
        serial=serial,
        model="24069PC21I",
        manufacturer="Xiaomi",
        brand="POCO",
        product_name="peridot_in",
        device="peridot",
        android_release="15",
        sdk=35,
        fingerprint="POCO/peridot_global/peridot:14/UKQ1.240624.001/OS2.0.100.0.VNPMIXM:user/"
        "release-keys",
        security_patch="2025-04-05",
        clock_offset_s=clock_offset_s,
        battery_level=64,
        display_width=1080,
        display_height=2400,
        timezone="Asia/Kolkata",
        extra_props=dict(XIAOMI_PERIDOT_PROPS),
        locale=locale or XIAOMI_PERIDOT_PROPS["persist.sys.locale"],
        packages=_messengers(
            {
                "signal": 10288,
                "telegram": 10276,
                "whatsapp": 10219,
                "gms": 10152,
                "chrome": 10171,
                "keyboard": 10139,
            },
            GBOARD,
        ),
    )


# The lab's first presets were a Galaxy S21 and a Poco X3 Pro; their names stay, for
# callers and phone config files, and now give the phones of the real dumps.
samsung_s21 = samsung_s936b
xiaomi_poco_x3_pro = xiaomi_24069pc21i


PRESETS = {
    "samsung-sm-s936b": samsung_s936b,
    "xiaomi-24069pc21i": xiaomi_24069pc21i,
    # the first presets' names, kept for existing phone config files
    "samsung-sm-g991b": samsung_s936b,
    "xiaomi-m2102j20sg": xiaomi_24069pc21i,
}


def load_phone_config(path: str | os.PathLike[str]) -> PhoneConfig:
    """Read a PhoneConfig from a YAML or JSON file (``preset: NAME`` plus overrides works too)."""
    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read phone config: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML/JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: a phone config must be a mapping")
    preset = raw.pop("preset", None)
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(
                f"{p}: preset: unknown phone {preset!r}",
                hint="known: " + ", ".join(sorted(PRESETS)),
            )
        raw = {**PRESETS[preset]().model_dump(), **raw}
    try:
        return PhoneConfig.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(x) for x in first["loc"])
        raise ConfigError(f"{p}: {field}: {first['msg']}") from exc


ENTER_SH = r"""#!/bin/sh
# Run one command line in a private mount namespace whose root is a tmpfs of bind mounts
# of the host's top-level entries plus the phone's /data, /storage and /sdcard.
# Usage (as root, under unshare -m --propagation private): enter.sh STATE_DIR [COMMAND]
set -e
S=$1
R="$S/rootfs"
mount -t tmpfs -o mode=0755,size=1m flowtruth-rootfs "$R"
for e in /*; do
    n=${e#/}
    case $n in data|sdcard|storage|'*') continue ;; esac
    if [ -L "$e" ]; then
        ln -s "$(readlink "$e")" "$R/$n"
    elif [ -d "$e" ]; then
        mkdir "$R/$n"
        mount --rbind "$e" "$R/$n" 2>/dev/null || rmdir "$R/$n"
    else
        : > "$R/$n"
        mount --bind "$e" "$R/$n" 2>/dev/null || rm -f "$R/$n"
    fi
done
mkdir "$R/data" "$R/storage" "$R/sdcard"
mount --bind "$S/fs/data" "$R/data"
mount --bind "$S/fs/storage" "$R/storage"
mount --bind "$S/fs/storage/emulated/0" "$R/sdcard"
set +e
if [ $# -ge 2 ]; then
    exec chroot "$R" /bin/sh "$S/run.sh" "$2"
fi
# No command: hold the namespace for later commands (they join it with nsenter).
exec chroot "$R" /bin/sh -c 'echo ready; exec sleep infinity'
"""

RUN_SH = r"""#!/bin/sh
# Run one command line with sh -c and pass on its exit status.  adbd starts us with
# PR_SET_PDEATHSIG=SIGTERM: if adbd dies, kill our whole process group, so no command
# outlives its adbd (a plain sh -c would leave its children behind).
trap 'trap - TERM HUP; kill -KILL 0' TERM HUP
exec 3<&0
/bin/sh -c "$1" <&3 3<&- &
wait $!
"""

# The tool itself runs without libfaketime (it applies the phone's clock offset itself,
# and libfaketime breaks Python's sleeps); commands it starts (su -c ...) get it back.
SHIM = """#!/bin/sh
if [ -n "$LD_PRELOAD" ]; then export FLOWTRUTH_FT_PRELOAD="$LD_PRELOAD"; unset LD_PRELOAD; fi
FLOWTRUTH_FAKETIME=0 exec {python} -S -c {code} "$@"
"""
# ``date +FORMAT`` (the netstat poller's stamps, one a block) without Python: where
# libfaketime shifts the caller's clock, the host's date already reads the phone's clock,
# which is what the toolbox's date computes (the host's clock plus the same offset).
DATE_SHIM = SHIM.replace(
    "#!/bin/sh\n",
    """#!/bin/sh
if [ "${{FLOWTRUTH_FAKETIME:-}}" = 1 ] && [ -n "${{LD_PRELOAD:-}}" ] && [ "$#" = 1 ]; then
    case "$1" in +*) exec /bin/date "$1" ;; esac
fi
""",
    1,
)
SHIM_CODE = (
    "import sys; sys.path.insert(0, {repo}); "
    "from controller.lab.toolbox_runtime import run_tool; "
    "sys.exit(run_tool({name}, sys.argv[1:]))"
)


def libfaketime_path() -> str | None:
    """Debian's libfaketime (package ``faketime``), if installed."""
    import glob

    found = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))
    return found[0] if found else None


def faketime_environment(offset_s: float) -> dict[str, str]:
    """Environment that shifts the wall clock of a phone's commands by its offset.

    On a real phone every program (strace -ttt, date, the netstat poller) reads the
    phone's clock. A lab phone shares the host's clock, so commands run through adb get
    libfaketime preloaded: strace's timestamps then carry the phone's offset exactly
    like a real phone's. Monotonic clocks stay real, so sleeps and timeouts are unaffected.
    Without libfaketime only the toolbox's own ``date`` applies the offset.
    """
    lib = libfaketime_path()
    if not offset_s or lib is None:
        return {}
    return {
        "LD_PRELOAD": lib,
        "FAKETIME": f"{offset_s:+.6f}s",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        rt.FAKETIME_ENV: "1",
    }


_REWRITE = re.compile(r"(?<![\w/.])(/data/local/tmp|/sdcard|/storage/emulated/0)(?=/|\b|$)")


class Toolbox:
    """One phone's shell: its state directory, shims, and the argv a command line runs as."""

    def __init__(
        self,
        config: PhoneConfig,
        state_dir: str | os.PathLike[str],
        netns: str | None = None,
        use_mount_namespace: bool | None = None,
    ) -> None:
        self.config = config
        self.state_dir = Path(state_dir).resolve()
        self.netns = netns
        is_root = os.geteuid() == 0
        if netns is not None and not is_root:
            raise RootRequired(
                f"entering network namespace {netns!r} needs root",
                hint="run the lab as root, or start adbd without a namespace",
            )
        if use_mount_namespace is None:  # FLOWTRUTH_LAB_MOUNTNS=0 forces the non-root fallback
            use_mount_namespace = is_root and os.environ.get("FLOWTRUTH_LAB_MOUNTNS", "1") != "0"
        self.use_mount_namespace = use_mount_namespace
        self._holder: subprocess.Popen[bytes] | None = None
        if self.use_mount_namespace and not is_root:
            raise RootRequired("a private mount namespace for the phone's shell needs root")

    @property
    def bin_dir(self) -> Path:
        return self.state_dir / "bin"

    def fs_path(self, device_path: str) -> Path:
        """Where a device path lives on the host (``/sdcard``, ``/storage``, ``/data`` move)."""
        norm = os.path.normpath("/" + device_path.lstrip("/")) if device_path else "/"
        for prefix, target in (
            ("/sdcard", "fs/storage/emulated/0"),
            ("/storage", "fs/storage"),
            ("/data", "fs/data"),
        ):
            if norm == prefix or norm.startswith(prefix + "/"):
                return self.state_dir / target / norm[len(prefix) :].lstrip("/")
        return Path(norm)

    def device_realpath(self, device_path: str, follow: bool = True) -> str:
        """Resolve symlinks as the phone sees them (absolute targets are device paths)."""
        pending = [p for p in device_path.split("/") if p]
        resolved: list[str] = []
        hops = 0
        while pending:
            part = pending.pop(0)
            if part in ("", "."):
                continue
            if part == "..":
                if resolved:
                    resolved.pop()
                continue
            candidate = "/" + "/".join([*resolved, part])
            host = self.fs_path(candidate)
            if (pending or follow) and host.is_symlink():
                hops += 1
                if hops > 40:  # ELOOP: give up and let the caller's stat fail naturally
                    return candidate
                target = os.readlink(host)
                if target.startswith("/"):
                    resolved = []
                pending = [p for p in target.split("/") if p] + pending
                continue
            resolved.append(part)
        return "/" + "/".join(resolved)

    def host_path(self, device_path: str, follow: bool = True) -> Path:
        """The host file behind a device path, following the phone's symlinks."""
        return self.fs_path(self.device_realpath(device_path, follow=follow))

    def is_phone_path(self, device_path: str) -> bool:
        """True for paths in the phone's own tree (/data, /sdcard, /storage), False for host paths."""
        return (self.state_dir / "fs") in self.host_path(device_path, follow=False).parents

    def prepare(self, reset: bool = False) -> None:
        """Create the state directory, the state file (unless present) and the shims."""
        for sub in (
            "bin",
            "rootfs",
            "fs/data/local/tmp",
            "fs/data/data",
            "fs/storage/emulated/0/Download",
        ):
            (self.state_dir / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.state_dir / "fs/data/local/tmp", 0o771)
        state_file = Path(rt.state_path(self.state_dir))
        if reset or not state_file.exists():
            rt.write_state(self.state_dir, self.config.initial_state())
        else:

            def refresh(state: dict[str, Any]) -> None:
                state["props"] = self.config.props()
                state["clock_offset_s"] = self.config.clock_offset_s
                state["faults"] = self.config.faults()

            rt.update_state(self.state_dir, refresh)
        (self.state_dir / rt.INPUT_LOG).touch()
        python = sys.executable
        for name in rt.TOOLS:
            shim = self.bin_dir / name
            code = SHIM_CODE.format(repo=json.dumps(str(REPO_ROOT)), name=json.dumps(name))
            template = DATE_SHIM if name == "date" else SHIM
            shim.write_text(template.format(python=shlex.quote(python), code=shlex.quote(code)))
            shim.chmod(0o755)
        for name, text in (("enter.sh", ENTER_SH), ("run.sh", RUN_SH)):
            script = self.state_dir / name
            script.write_text(text)
            script.chmod(0o755)

    def environment(self) -> dict[str, str]:
        """The environment of a shell command, as adbd gives it on Android (plus our keys)."""
        host_path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        tmp = (
            "/data/local/tmp" if self.use_mount_namespace else str(self.fs_path("/data/local/tmp"))
        )
        env = {
            "PATH": f"{self.bin_dir}:{host_path}",
            "HOME": "/",
            "USER": "shell",
            "SHELL": "/bin/sh",
            "HOSTNAME": "localhost",
            "TMPDIR": tmp,
            "ANDROID_DATA": "/data",
            "ANDROID_ROOT": "/system",
            "ANDROID_STORAGE": "/storage",
            "EXTERNAL_STORAGE": "/sdcard",
            "LANG": "C.UTF-8",
            "PS1": f"{self.config.device}:/ $ ",
            rt.STATE_ENV: str(self.state_dir),
            rt.UID_ENV: "2000",
            "FLOWTRUTH_MOUNTNS": "1" if self.use_mount_namespace else "0",
        }
        env.update(faketime_environment(self.config.clock_offset_s))
        return env

    def rewrite(self, command: str) -> str:
        """Without a mount namespace, point device paths in a command line at the phone's tree."""
        if self.use_mount_namespace:
            return command
        return _REWRITE.sub(lambda m: shlex.quote(str(self.fs_path(m.group(1)))), command)

    def start(self) -> None:
        """Set up the phone's mount namespace once, held by a sleeping process (root only).

        Commands then join it with ``nsenter`` (about 2 ms) instead of building it anew
        (about 70 ms).  Without ``start()`` every command builds its own namespace.
        """
        if not self.use_mount_namespace or self._holder is not None:
            return
        argv = [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "/bin/sh",
            str(self.state_dir / "enter.sh"),
            str(self.state_dir),
        ]
        if self.netns is not None:
            argv = ["ip", "netns", "exec", self.netns, *argv]
        holder = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        assert holder.stdout is not None and holder.stderr is not None
        ready = holder.stdout.readline()
        holder.stdout.close()
        if ready.strip() != b"ready":
            holder.kill()
            err = holder.stderr.read().decode(errors="replace").strip()
            holder.wait()
            holder.stderr.close()
            raise LabError(
                f"cannot set up the mount namespace of phone {self.config.serial}: {err}",
                hint="the lab needs root, unshare(1) and mount(8)",
            )
        holder.stderr.close()
        self._holder = holder

    def stop(self) -> None:
        """End the phone's mount namespace (kills the holder process)."""
        holder, self._holder = self._holder, None
        if holder is not None:
            holder.kill()
            holder.wait()

    def argv(self, command: str) -> list[str]:
        """The argv that runs ``command`` (a device shell command line) for this phone."""
        if self._holder is not None and self._holder.poll() is None:
            argv = [
                "nsenter",
                f"--target={self._holder.pid}",
                "--mount",
                "--root",
                "--wd",
                "/bin/sh",
                str(self.state_dir / "run.sh"),
                command,
            ]
        elif self.use_mount_namespace:
            argv = [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "/bin/sh",
                str(self.state_dir / "enter.sh"),
                str(self.state_dir),
                command,
            ]
        else:
            argv = ["/bin/sh", str(self.state_dir / "run.sh"), self.rewrite(command)]
        if self.netns is not None:
            argv = ["ip", "netns", "exec", self.netns, *argv]
        return argv

    def remove(self) -> None:
        """Delete the state directory (the phone is gone)."""
        self.stop()
        shutil.rmtree(self.state_dir, ignore_errors=True)


def dump_config(config: PhoneConfig) -> str:
    """A phone config as JSON text (what ``--config`` accepts)."""
    return json.dumps(config.model_dump(), indent=2)
