"""The controller's error tree; the CLI maps each to an exit code and one line."""

from __future__ import annotations

from analysis.errors import FlowtruthError


class ControllerError(FlowtruthError):
    """A failure in the controller (devices, lab, AP, sessions)."""


class ConfigError(ControllerError):
    """A plan, scenario or config file is malformed; names the file and field."""

    exit_code = 2


class DeviceError(ControllerError):
    """A phone failed or vanished; names the device serial."""


class RootRequired(ControllerError):
    """The operation needs root (on the host or on the phone)."""


class ApError(ControllerError):
    """The access point could not be set up or torn down."""


class CaptureError(ControllerError):
    """Packet capture failed (missing binary, interface gone, drops)."""


class LabError(ControllerError):
    """The virtual lab could not be brought up or torn down."""
