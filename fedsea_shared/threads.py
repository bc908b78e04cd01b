"""Which threads of a process run torch ops in parallel, and with how many threads.

libgomp (the OpenMP runtime of torch's CPU build) keeps its idle workers spinning between
parallel regions only while the process holds no more OpenMP threads than cores; past that
(it counts every team, idle ones included) each region wakes its workers through the kernel
instead.  On the 2-core machine that made a second team, of any size above 1, cost the whole
gain of the first: 150 products of 1536x576 by one row took 20 ms with one team of 2, 33 ms
once an event-loop thread had run a single parallel op (`nan_to_num` over the 49152 logits is
above torch's grain size), 39 ms with 1 thread.  So the rule of a process here is one team:

- `serial()`: every thread that touches torch but only to move or check small tensors (the
  event loops, the engine's and the edge worker's own loops) runs its ops on itself;
- the thread that runs the forward passes has the process's cores.  In `fedsea serve` both
  sides' forward passes, the edge's head/tail/LM head and the server's middle blocks, run on
  one `ComputeThread`: on 2 cores one pass at a time with both cores beats the edge and the
  engine overlapping with one core each.  `fedsea server` and `fedsea gateway` as separate
  processes run their forward passes on the engine thread and the edge worker thread.

torch.set_num_threads is process-wide (a thread adopts the value at its next op), so
`serial()` sets libgomp's per-thread value directly, after torch's own per-thread setup.
"""

from __future__ import annotations

import ctypes
import os
import queue
import threading
from concurrent.futures import Future
from typing import Callable, TypeVar

import torch

ENV = "FEDSEA_THREADS"
T = TypeVar("T")


def core_budget() -> int:
    """Cores this process may use: $OMP_NUM_THREADS when set (a limit its launcher chose),
    else the CPUs it is allowed to run on."""
    omp = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if omp.isdigit() and int(omp) > 0:
        return int(omp)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def compute_threads(flag: int | None) -> tuple[int, str]:
    """(intra-op threads of the process's compute thread, where the number came from):
    `flag` (--threads), else $FEDSEA_THREADS, else the core budget."""
    if flag is not None:
        source, value = "--threads", str(flag)
    elif os.environ.get(ENV):
        source, value = f"${ENV}", os.environ[ENV]
    else:
        return core_budget(), "cores"
    if not value.strip().isdigit() or int(value) < 1:
        raise ValueError(f"{source} must be a whole number >= 1, got {value!r}")
    return int(value), source


def apply(threads: int) -> None:
    """Make `threads` torch's intra-op thread count for the process."""
    torch.set_num_threads(threads)


def _libgomp() -> ctypes.CDLL | None:
    path = os.path.join(os.path.dirname(torch.__file__), "lib", "libgomp.so.1")
    try:
        return ctypes.CDLL(path, mode=getattr(os, "RTLD_NOLOAD", 0))  # torch's own copy, already loaded
    except OSError:
        return None  # another OpenMP runtime (or none): nothing to keep apart


_GOMP = _libgomp()


def serial() -> None:
    """Run the calling thread's torch ops on it alone, leaving every other thread's count
    as it is."""
    torch.get_num_threads()  # torch's per-thread setup, which would overwrite the value below
    if _GOMP is not None:
        _GOMP.omp_set_num_threads(1)


class ComputeThread:
    """One thread that runs the forward passes of all the sides a process holds.

    `run(fn, *args)` runs fn there and blocks the calling thread until it returns (or raises
    there, then here).  Callers are the engine thread and the edge worker thread, each still
    the sole owner of its state: while fn runs on its behalf, it waits."""

    def __init__(self, name: str = "fedsea-compute"):
        self._work: queue.SimpleQueue[tuple[Future, Callable, tuple] | None] = queue.SimpleQueue()
        self._closed = False
        self._lock = threading.Lock()  # a job is queued before the close marker or refused, never after it
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def run(self, fn: Callable[..., T], *args) -> T:
        fut: Future = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("the compute thread is closed")
            self._work.put((fut, fn, args))
        return fut.result()

    def close(self, timeout: float = 30.0) -> None:
        """Run what is queued, refuse more, and wait for the thread to finish: a daemon
        thread that the interpreter's exit stops inside a torch op aborts the whole process
        (std::terminate while it unwinds to take the GIL)."""
        with self._lock:
            self._closed = True
            self._work.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _serve(self) -> None:
        while (job := self._work.get()) is not None:
            fut, fn, args = job
            try:
                fut.set_result(fn(*args))
            except BaseException as e:  # delivered to the caller, which decides
                fut.set_exception(e)


def run_here(fn: Callable[..., T], *args) -> T:
    """The default for a side without a shared compute thread: its own thread runs it."""
    return fn(*args)
