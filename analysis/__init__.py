"""flowtruth's analysis library: captures to labelled bi-flows, datasets and classifiers.

It is a pure library: it never imports ``controller``, ``ap_setup``, ``textual`` or
``adbutils`` (``tests/test_import_hygiene.py`` keeps it so).
"""

from __future__ import annotations

__version__ = "0.1.0"
