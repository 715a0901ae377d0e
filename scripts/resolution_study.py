#!/usr/bin/env python3
"""The resolution study (Li et al.'s analysis) on the embedded synthetic benchmark, or on your data.

The same entry point as ``retina-scale study``: the stepwise ladder, the top stage from scratch for
the same training time and the throughput measurement, then REPORT.md, report.json and figures/ in
the study folder (runs/resolution-study; rerun to resume). ``--help`` lists every option.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from retina_scale.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["study", *sys.argv[1:]], console=True))
