#!/usr/bin/env python3
"""Multi-scale stepwise training (Li et al., IJCNN 2019), the main job of retina_scale.

The same entry point as ``retina-scale train``: with no arguments it runs the ``quick`` preset on
the embedded synthetic data set (a few minutes on a 2-core CPU); ``--config paper --data DIR``
runs the paper's 112 -> 224 -> 448 -> 896 ladder on your images. ``--help`` lists every option.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from retina_scale.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]], console=True))
