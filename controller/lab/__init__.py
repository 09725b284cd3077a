"""The virtual lab: network namespaces standing in for phones, each with an emulated adbd.

``adbd.EmulatedAdbd`` speaks the device side of the ADB wire protocol, so the real adb
server attaches with ``adb connect``; ``toolbox`` gives each phone its identity
(``PhoneConfig``) and an Android-like shell.  Importing this package stays cheap: the
toolbox shims import ``toolbox_runtime`` on every command.
"""

from __future__ import annotations
