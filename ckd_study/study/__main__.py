"""``python -m ckd_study.study``."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
