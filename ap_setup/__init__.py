"""Access-point set-up: hostapd, dnsmasq, NAT, packet capture and preflight checks."""

from __future__ import annotations
