#!/usr/bin/env python
"""Same as ``anchorcontext train``: ``python scripts/train.py --config configs/demo.yaml --max_steps 20``."""

import sys

from anchorcontext.training.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
