"""Datasets: `dtop prepare` (official archives -> mmseg folders) and the embedded demo data.

Heavy modules (pycocotools, scipy, PIL) are imported by the converters that need them, so
`import dtop_cli.data` stays cheap for the CLI's --help.
"""

from __future__ import annotations

from .prepare import DATASETS, OFFICIAL_URLS, prepare_dataset
from .verify import OFFICIAL_PAIRS, layout, verify_dataset

__all__ = ["DATASETS", "OFFICIAL_PAIRS", "OFFICIAL_URLS", "layout", "prepare_dataset", "verify_dataset"]
