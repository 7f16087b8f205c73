"""rlhf: close the human-feedback loop around a foundation model."""

import os

__version__ = "0.1.0"

# PyTorch's CPU allocator puts tensors of 2 MB and more on transparent huge pages when this is set before torch is
# first imported (Linux with THP in `madvise` or `always` mode; elsewhere it changes nothing), so a CPU training
# step maps its large tensors with 512x fewer page faults (docs/performance.md). THP_MEM_ALLOC_ENABLE=0 keeps
# PyTorch's default.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
