"""Under torchrun: process 1 arrives late at a barrier; process 0 waits at most the configured timeout."""

import sys
import time

import torch.distributed

from reasonmaxxer.utils import distributed as dist

timeout_s, late_s = float(sys.argv[1]), float(sys.argv[2])
dist.init(timeout_s=timeout_s)
if dist.rank() == 1:
    time.sleep(late_s)
start = time.perf_counter()
try:
    dist.barrier()
except Exception as err:  # gloo's timeout: what a user's run would die of
    print(f"rank {dist.rank()} gave up after {time.perf_counter() - start:.1f} s: {type(err).__name__}", flush=True)
    sys.exit(3)
print(f"rank {dist.rank()} waited {time.perf_counter() - start:.1f} s", flush=True)
rank = dist.rank()
dist.close()
print(f"rank {rank} left the group: {not torch.distributed.is_initialized()}", flush=True)
