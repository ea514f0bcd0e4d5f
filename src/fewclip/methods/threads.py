"""Intra-op threads for loops of small tensor operations.

A training loop of thousands of steps whose every step is a few small products (LP++ and CLAP on a few classes) gains
nothing from torch's intra-op threads and loses much to them: each parallel region waits for every thread to be
scheduled, which on a busy machine costs a scheduler time slice per operation (measured here: the demo's six LP++
fits take 0.26 CPU-seconds on one thread and 8.5 on two on a loaded 2-core machine). :func:`threads_for` runs such a
loop on one thread and leaves larger work to torch's setting.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

#: multiply-adds per step below which one thread runs the loop (about 50 µs of one core's float32 matmul)
SMALL_STEP_MACS = 1 << 20


@contextlib.contextmanager
def threads_for(step_macs: float) -> Iterator[None]:
    """One intra-op thread inside the block when a step costs fewer than :data:`SMALL_STEP_MACS` multiply-adds;
    torch's setting is restored afterwards (it is process-wide: do not fit in several Python threads at once)."""
    before = torch.get_num_threads()
    if step_macs >= SMALL_STEP_MACS or before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
