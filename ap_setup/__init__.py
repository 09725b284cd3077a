"""Access-point set-up: hostapd, dnsmasq, NAT, packet capture and preflight checks.

- :mod:`ap_setup.config`: the typed :class:`~ap_setup.config.ApConfig` (YAML/TOML).
- :mod:`ap_setup.render`: pure renderers (hostapd.conf, dnsmasq.conf, nft, iptables,
  NetworkManager drop-in), pinned by golden files.
- :mod:`ap_setup.runner`: the ``Runner`` port (argv lists, optional ``ip netns exec``).
- :mod:`ap_setup.lifecycle`: ``ap_up`` / ``ap_down`` / ``ap_status`` with the state file
  of :mod:`ap_setup.state`; daemons supervised by :mod:`ap_setup.supervise`.
- :mod:`ap_setup.capture`: tcpdump/dumpcap capture, drop counters, capture QA.
- :mod:`ap_setup.check`: ``flowtruth ap check``.

The virtual lab uses the same code with ``ApConfig(radio=False, netns=..., interface=<veth>)``.
"""

from __future__ import annotations
