"""``python -m retina_scale`` is the same as the ``retina-scale`` console entry point."""
import sys

from retina_scale.cli import main

sys.exit(main())
