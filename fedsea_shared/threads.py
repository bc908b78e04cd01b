"""How many torch intra-op (OpenMP) threads each compute thread of a process uses.

`fedsea serve` runs two compute threads in one process, the edge worker and the server's
engine, and they overlap (one group of sessions' head/tail runs while another's middle
blocks do).  Each thread that runs a parallel torch op drives its own OpenMP team, so with
torch's default (one thread per core for every team) the two teams together ask for twice
the cores there are, and every op waits at its team's barrier for a thread the OS has not
scheduled.  The policy: split the cores between the two, `cores // 2` each (at least 1).

What torch 2.13 (libgomp, MKL) does, measured here: `torch.set_num_threads(n)` sets the
calling thread's team size and the process default; a thread adopts the default the first
time it runs a parallel op and keeps it after.  So setting it once, before the edge worker
and the engine run their first op, sizes both.  The inter-op pool is not used by fedsea.

`fedsea server` and `fedsea gateway` as separate processes keep torch's default (or
$OMP_NUM_THREADS): each has the machine, or its share, to itself.
"""

from __future__ import annotations

import os

ENV = "FEDSEA_THREADS"


def core_budget() -> int:
    """Cores this process may use: $OMP_NUM_THREADS when set (a limit its launcher chose),
    else the CPUs it is allowed to run on."""
    omp = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if omp.isdigit() and int(omp) > 0:
        return int(omp)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def threads_per_compute_thread(flag: int | None, compute_threads: int = 2) -> tuple[int, str]:
    """(threads, where the number came from): `flag` (--threads), else $FEDSEA_THREADS,
    else the core budget split between the process's compute threads."""
    if flag is not None:
        source, value = "--threads", str(flag)
    elif os.environ.get(ENV):
        source, value = f"${ENV}", os.environ[ENV]
    else:
        budget = core_budget()
        return max(1, budget // compute_threads), f"{budget} cores / {compute_threads} compute threads"
    if not value.strip().isdigit() or int(value) < 1:
        raise ValueError(f"{source} must be a whole number >= 1, got {value!r}")
    return int(value), source


def apply(threads: int) -> None:
    """Make `threads` the team size of every thread that runs its first torch op from now on."""
    import torch

    torch.set_num_threads(threads)
