"""Executors: how the engine's ticks reach the model's ranks (vLLM's executor / worker split).

`InProcessExecutor`: one rank, the worker in this process.  `DistributedExecutor`: N
tensor-parallel ranks over torch.distributed (gloo on the CPU, NCCL on CUDA), one process
each: rank 0 is this process (the websocket, the engine, the block allocator and its own
share of the blocks), ranks 1..N-1 are spawned here (`torch.multiprocessing`, one host) or
started by torchrun next to it (`serve_rank`, several hosts).  Each tick rank 0 broadcasts
the plan as plain data (`TickPlan.pack`: a header, the packed ints, the input rows), every
rank runs its share, and the all-reduces inside the blocks leave rank 0 with the output.

Health: the ticks' collectives run in a process group with `--tensor-parallel-timeout`, so
a rank that dies or hangs fails the next collective within that time instead of stalling
the server; while no tick runs, rank 0 sends a keep-alive all-reduce every third of it, and
a spawned rank's exit is seen at once.  The header of each message goes over the default
group instead (long timeout): an idle rank waits for it without timing out.  One process
holds one torch.distributed default group, so it runs at most one tensor-parallel server.  A failure is final: the executor calls
`on_failure` (the server goes unhealthy and closes its connections, so edges replay their
sessions on another server) and runs nothing more.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import wait as wait_for_exit
from typing import Callable, Protocol

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .metrics import ServerMetrics
from .tick_plan import TickPlan
from .worker import RankGroup, Worker, comm_device, rank_device

log = logging.getLogger("fedsea.server.executor")

# Start-up collectives wait this long for the slowest rank to load its shard; ranks 1..N-1
# wait this long for rank 0's next message too (rank 0 checks them with the tick timeout).
STARTUP_TIMEOUT = timedelta(minutes=10)
# Header of each broadcast: what follows.
_STOP, _PING, _TICK = 0, 1, 2


@dataclass
class TickTraffic:
    """What one tick sent between ranks, as rank 0 saw it."""

    broadcast_seconds: float
    broadcast_bytes: int
    allreduce_seconds: float
    allreduce_bytes: int


class ExecutorFailed(RuntimeError):
    """A rank died or stopped answering: this server runs no more ticks."""


class Executor(Protocol):
    worker: Worker  # rank 0's (this process's)
    failure: str | None  # why the executor stopped, once it has

    def execute(self, plan: TickPlan) -> torch.Tensor: ...
    def keep_alive(self) -> None: ...
    def shutdown(self) -> None: ...


class InProcessExecutor:
    failure = None

    def __init__(self, worker: Worker):
        self.worker = worker

    def execute(self, plan: TickPlan) -> torch.Tensor:
        return self.worker.execute(plan)

    def keep_alive(self) -> None:
        pass

    def shutdown(self) -> None:
        pass


def make_executor(settings, metrics: ServerMetrics, on_failure: Callable[[str], None]) -> Executor:
    if settings.tensor_parallel < 1:
        raise ValueError(f"--tensor-parallel must be >= 1 (got {settings.tensor_parallel})")
    if settings.tensor_parallel == 1:
        return InProcessExecutor(Worker(settings))
    if settings.enable_training:
        raise ValueError("a tensor-parallel server does not train yet: start it without --enable-training "
                         "(or serve training from a server of one rank)")
    return DistributedExecutor(settings, metrics, on_failure)


def torchrun_rank(world: int) -> int | None:
    """This process's rank when torchrun started it (its environment), else None."""
    if "WORLD_SIZE" not in os.environ:
        return None
    if int(os.environ["WORLD_SIZE"]) != world:
        raise ValueError(f"torchrun started {os.environ['WORLD_SIZE']} processes for --tensor-parallel {world}")
    return int(os.environ["RANK"])


def _backend(device: str) -> str:
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def _join(settings, rank: int, world: int, init_method: str) -> RankGroup:
    """Join the process group, and make the group the ticks run in (with the tick timeout)."""
    backend = _backend(settings.device)
    if backend == "nccl":
        torch.cuda.set_device(rank_device(settings.device, rank))  # NCCL's collectives use the current device
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world, timeout=STARTUP_TIMEOUT)
    ticks = dist.new_group(list(range(world)), timeout=timedelta(seconds=settings.tensor_parallel_timeout),
                           backend=backend)
    return RankGroup(rank, world, ticks)


class DistributedExecutor:
    def __init__(self, settings, metrics: ServerMetrics, on_failure: Callable[[str], None]):
        world = settings.tensor_parallel
        self.metrics = metrics
        self.on_failure = on_failure
        self.failure: str | None = None
        self.last_tick: TickTraffic | None = None
        self.timeout = settings.tensor_parallel_timeout
        self._stopping = False
        self._processes: list = []
        if dist.is_initialized():
            raise ValueError("this process already runs a tensor-parallel server (one torch.distributed group each)")
        if torchrun_rank(world) not in (None, 0):
            raise ValueError("only rank 0 serves edges: start the others with serve_rank")
        if torchrun_rank(world) == 0:
            init_method = "env://"
        else:  # spawned here, on this host
            init_method = f"tcp://127.0.0.1:{_free_port()}"
            context = mp.get_context("spawn")
            self._processes = [context.Process(target=serve_rank, args=(settings, rank, world, init_method),
                                               name=f"fedsea-rank-{rank}", daemon=True) for rank in range(1, world)]
            for p in self._processes:
                p.start()
        try:
            self.ranks = _join(settings, 0, world, init_method)
            self.worker = Worker(settings, self.ranks)
            dist.barrier()  # every rank loaded and warmed: from here on each answers within the tick timeout
        except BaseException:
            self._stop_processes()
            raise
        self.device = comm_device(self.worker.device)
        self._last_collective = time.monotonic()
        metrics.tensor_parallel_ranks.set(world)
        if self._processes:
            threading.Thread(target=self._watch, name="fedsea-rank-watch", daemon=True).start()

    def execute(self, plan: TickPlan) -> torch.Tensor:
        if self.failure:
            raise ExecutorFailed(self.failure)
        if plan.model is not None:
            raise ValueError("a tensor-parallel server serves the base model only")
        plan = plan.to(self.worker.device, self.worker.dtype)
        try:
            t0 = time.perf_counter()
            sent = self._broadcast(_TICK, plan.pack(), plan.hidden)
            broadcast = time.perf_counter() - t0
            self.worker.all_reduces.take()
            out = self.worker.execute(plan)
        except Exception as e:
            self._fail(f"a tick's collective failed ({type(e).__name__}: {e})")
            raise ExecutorFailed(self.failure) from e
        seconds, nbytes, _ = self.worker.all_reduces.take()
        self._last_collective = time.monotonic()
        self.last_tick = TickTraffic(broadcast, sent, seconds, nbytes)
        m = self.metrics
        m.tensor_parallel_broadcast_seconds.observe(broadcast)
        m.tensor_parallel_broadcast_bytes.inc(sent)
        m.tensor_parallel_allreduce_seconds.observe(seconds)
        m.tensor_parallel_allreduce_bytes.inc(nbytes)
        return out

    def _broadcast(self, kind: int, packed: torch.Tensor | None = None, hidden: torch.Tensor | None = None) -> int:
        """Send a header (and a tick's plan) to every rank; bytes sent."""
        group = self.ranks.group
        header = torch.tensor([kind, 0 if packed is None else packed.numel(),
                               0 if hidden is None else hidden.shape[0]], dtype=torch.long, device=self.device)
        # The default group (a rank waits for a header as long as rank 0 is idle), within the tick timeout here.
        dist.broadcast(header, 0, async_op=True).wait(timeout=timedelta(seconds=self.timeout))
        sent = header.nbytes
        if packed is not None:
            packed = packed.to(self.device)
            dist.broadcast(packed, 0, group=group)
            rows = hidden.to(self.device).contiguous()
            dist.broadcast(rows, 0, group=group)
            sent += packed.nbytes + rows.nbytes
        return sent

    def keep_alive(self) -> None:
        """While no tick runs: an all-reduce every third of the timeout, which every rank
        must join (a stopped rank fails it; a broadcast alone would not wait for it)."""
        if self.failure or time.monotonic() - self._last_collective < self.timeout / 3:
            return
        try:
            self._broadcast(_PING)
            dist.all_reduce(torch.zeros(1, device=self.device), group=self.ranks.group)
        except Exception as e:
            self._fail(f"a rank did not answer the keep-alive in {self.timeout:g}s ({type(e).__name__}: {e})")
            return
        self._last_collective = time.monotonic()

    def _watch(self) -> None:
        """See a spawned rank's exit at once (not at the next collective)."""
        ready = wait_for_exit([p.sentinel for p in self._processes])
        if not self._stopping:
            dead = next(p for p in self._processes if p.sentinel in ready)
            self._fail(f"tensor-parallel rank {dead.name.rsplit('-', 1)[-1]} exited (code {dead.exitcode})")

    def _fail(self, reason: str) -> None:
        if self.failure:
            return
        self.failure = reason
        self.metrics.tensor_parallel_healthy.set(0)
        log.error("tensor-parallel server unhealthy: %s", reason)
        self.on_failure(reason)

    def shutdown(self) -> None:
        self._stopping = True
        if not self.failure:
            try:
                self._broadcast(_STOP)
            except Exception:
                log.warning("could not tell the ranks to stop", exc_info=True)
        self._stop_processes()
        dist.destroy_process_group()

    def _stop_processes(self) -> None:
        self._stopping = True
        for p in self._processes:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()


def serve_rank(settings, rank: int, world: int, init_method: str = "env://") -> None:
    """A tensor-parallel rank other than 0: join the group, load its share, then run each
    plan rank 0 broadcasts until told to stop (or until rank 0 is gone: exit 1)."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank {rank} %(name)s: %(message)s")
    # The host's cores shared out among the ranks it runs (rank 0's threads are its own business).
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    ranks = _join(settings, rank, world, init_method)
    worker = Worker(settings, ranks)
    worker.warm()
    dist.barrier()
    device = comm_device(worker.device)
    try:
        with torch.inference_mode():
            while True:
                header = torch.zeros(3, dtype=torch.long, device=device)
                dist.broadcast(header, 0)
                kind, ints, rows = header.tolist()
                if kind == _STOP:
                    break
                if kind == _PING:
                    dist.all_reduce(torch.zeros(1, device=device), group=ranks.group)
                    continue
                packed = torch.empty(ints, dtype=torch.long, device=device)
                dist.broadcast(packed, 0, group=ranks.group)
                hidden = torch.empty(rows, worker.config.hidden_size, dtype=worker.dtype, device=device)
                dist.broadcast(hidden, 0, group=ranks.group)
                worker.execute(TickPlan.unpack(packed.cpu(), settings.block_size, hidden))
    except Exception:
        log.exception("rank %d: lost rank 0 (or a peer); exiting", rank)
        raise SystemExit(1)
    log.info("rank %d: stopped", rank)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
