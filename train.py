#!/usr/bin/env python
"""Train a fork-gated LoRA adapter: `python train.py --config configs/demo.yaml`."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "src"))

from reasonmaxxer.cli import train_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(train_main())
