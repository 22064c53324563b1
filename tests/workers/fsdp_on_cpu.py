"""Run a script (train.py) with accelerate's FSDP on CPU processes, under torchrun.

    torchrun --nproc_per_node 2 fsdp_on_cpu.py train.py ARGS...

See ``reasonmaxxer.testing.allow_fsdp_on_cpu``: on CPU accelerate would run DDP instead.
"""

import runpy
import sys

from reasonmaxxer.testing import allow_fsdp_on_cpu

allow_fsdp_on_cpu()
script, sys.argv = sys.argv[1], sys.argv[1:]
runpy.run_path(script, run_name="__main__")
