"""flowtruth's controller: session engine, device layer, virtual lab, CLI and TUI."""

from __future__ import annotations
