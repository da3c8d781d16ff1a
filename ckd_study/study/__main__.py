"""``python -m ckd_study.study``: the study's commands, the same as ``python -m ckd_study <command>``."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
