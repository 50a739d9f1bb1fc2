"""Tensor work off a replica's event loop, on one thread that keeps torch's thread setting.

``torch.set_num_threads`` holds for the thread that calls it: OpenMP keeps its team size per
thread, so a worker of ``asyncio.to_thread`` computes with one core whatever the replica's main
thread set. Measured on this project's 2-core machine (``OMP_NUM_THREADS=1``, as Ray sets it for a
fractional CPU): after ``set_num_threads(2)`` a 64x4096 by 4096x4096 matmul takes 7.1 ms on the
main thread and 17.2 ms on a ``threading.Thread``; 7.5 ms on a thread that set 2 itself.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

Result = TypeVar("Result")


class ComputeThread:
    """One worker thread for a replica's tensor work, running with ``threads`` intra-op threads
    (default: what this process's torch has, i.e. ``OMP_NUM_THREADS`` or Ray's setting)."""

    def __init__(self, threads: int | None = None):
        self.threads = threads or torch.get_num_threads()
        self._executor = ThreadPoolExecutor(
            1, thread_name_prefix="compute", initializer=torch.set_num_threads, initargs=(self.threads,)
        )

    async def run(self, fn: Callable[..., Result], *args) -> Result:
        return await asyncio.get_running_loop().run_in_executor(self._executor, functools.partial(fn, *args))
