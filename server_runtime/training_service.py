"""The server's side of split fine-tuning: per-job LoRA adapters on the middle blocks.

Per step a client sends `train_forward` (its noised head output, packed, with lengths) and
later `train_backward` (the loss gradient at its tail input).  The service runs the middle
blocks with autograd, keeps the graph until the backward arrives (or `step_timeout`
passes, which frees it), back-propagates into its adapter, returns the gradient at its
input and takes an optimizer step every `grad_accum` micro-batches.

Scheduling modes (the paper's): *sequential* gives the job's clients turns, one whole step
each; *batched* fuses one forward of every client into one pass through one shared adapter
(and one backward once they all answered), so each optimizer step is the mean gradient of
all clients' batches, however late one of them is (a pass runs without a client only after
`batched_wait`); *hierarchical* fuses the forwards that arrive within `fuse_window`, each
client with its own adapter, selected per row, and the adapters are averaged at every
FedAvg round.  FedAvg of the edges' adapters happens here
too (`train_aggregate`): the server only averages vectors it cannot interpret.

Jobs belong to a tenant (the API key that created them; None on a server without keys):
a job name is looked up only among its tenant's jobs, so another key can neither see,
join, export nor average into it.  FedAvg weighs each client by the samples whose
backward the server itself ran for it since its last round, not by a number it reports.
Training state has a memory budget (`memory`, bytes): a job's adapters and optimizer
state are charged at creation, each forward's autograd state until its backward is done
or freed; a request that does not fit is refused.  A job is freed when its last client
leaves or disconnects.

Checkpoints: a round aggregated with `checkpoint` copies the job's adapters, AdamW moments
and counters before any client hears back (no step is open then); `train_checkpoint` hands
the copy to the client, which stores it with its own state and uploads it in the
`train_join` that recreates the job on a restarted or another server.  The upload is
checked like any input (`_check_resume`) before it replaces the fresh state.

All model work runs on one worker thread; the bookkeeping below runs on the event loop,
so it needs no locks.  The base weights are shared with the inference engine (read only);
each job gets a shallow copy of the shard that carries its adapters.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from fedsea_shared.architectures import context_limit
from fedsea_shared.protocol import (
    AdapterState,
    ErrorCode,
    ProtocolError,
    TrainAggregate,
    TrainAggregated,
    TrainBackward,
    TrainCheckpoint,
    TrainCheckpointState,
    TrainExport,
    TrainForward,
    TrainGrad,
    TrainJoin,
    TrainJoined,
    TrainLeave,
    TrainLeft,
    TrainOutput,
    TrainState,
    tensor_meta,
)
from fedsea_shared.shard import ModelShard, Partition, head_dim
from fedsea_shared.training import (
    AdapterOptimizer,
    flatten,
    inject_lora,
    load_flat,
    lora_parameters,
    packed_attention,
    packed_positions,
)

log = logging.getLogger("fedsea.server.training")

SHARED = "shared"  # the adapter name when all clients share one server adapter


@dataclass
class TrainingSettings:
    step_timeout: float = 30.0  # seconds a forward's autograd state waits for its backward
    memory: int = 2 * 2**30  # bytes of adapters, optimizer and autograd state, all jobs together
    fuse_window: float = 0.25  # seconds a hierarchical pass waits for the other clients' forwards
    # Seconds a batched pass waits for every client's forward.  A pass without some clients
    # would step the shared adapter on part of the step's data and, stepping again for the
    # latecomers, take more steps than the schedule (both seen with 4 clients on 2 loaded cores).
    batched_wait: float = 300.0
    aggregate_timeout: float = 300.0  # seconds a FedAvg round waits for missing clients
    max_tokens: int = 32768  # rows of one train_forward


@dataclass(eq=False)
class _Member:
    conn: int
    client: int
    job: "_Job"
    samples: int = 0  # samples whose backward the server ran since this client's last round

    @property
    def adapter(self) -> str:
        return f"c{self.client}" if self.job.spec.mode == "hierarchical" else SHARED


@dataclass(eq=False)
class _Pending:
    """A train_forward waiting to be fused into its job's next pass."""

    member: _Member
    sid: int
    lengths: list[int]
    hidden: torch.Tensor
    reply: asyncio.Future
    nbytes: int  # training memory charged for its autograd state
    flushed: bool = False  # part of a pass now (which then owns the sequential turn and the charge)


@dataclass(eq=False)
class _Group:
    """One fused forward whose autograd graph waits for its members' backward."""

    job: "_Job"
    rows: dict[tuple[int, int], slice]  # (conn, sid) -> rows of the fused batch
    adapter_of: dict[tuple[int, int], str]
    inp: torch.Tensor
    out: torch.Tensor
    samples: dict[tuple[int, int], int]
    nbytes: int
    grads: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    waiters: dict[tuple[int, int], asyncio.Future] = field(default_factory=dict)
    gone: set[tuple[int, int]] = field(default_factory=set)
    finishing: bool = False
    timer: asyncio.TimerHandle | None = None  # frees the graph if backward never comes

    def complete(self) -> bool:
        return all(k in self.grads or k in self.gone for k in self.rows)


@dataclass(eq=False)
class _Round:
    contributions: dict[int, tuple[int, torch.Tensor, asyncio.Future]] = field(default_factory=dict)
    timer: asyncio.TimerHandle | None = None
    checkpoint: bool = False  # a client asked to keep the server state as of this round


@dataclass(eq=False)
class _Checkpoint:
    """The job's server state as of the end of a round, kept for train_checkpoint."""

    round: int
    adapters: list[AdapterState]
    state: torch.Tensor  # [adapters, 3, values]


class _Job:
    """Event-loop-side state of a job; `shard` and `optimizers` belong to the worker."""

    def __init__(self, key: tuple, name: str, spec: TrainJoin, shard: ModelShard,
                 optimizers: dict[str, AdapterOptimizer], nbytes: int):
        self.key = key  # (tenant, name)
        self.name = name
        self.nbytes = nbytes  # training memory charged for adapters and optimizer state
        self.spec = spec
        self.shard = shard
        self.optimizers = optimizers
        self.members: dict[int, _Member] = {}  # by client id
        self.turn = asyncio.Lock()  # sequential mode: one client's step at a time
        self.pending: list[_Pending] = []
        self.flush_timer: asyncio.TimerHandle | None = None
        self.rounds: dict[int, _Round] = {}
        self.row_adapters: list[str] | None = None  # read by the LoRA pre-hooks during a pass
        self.joined: set[int] = set()  # clients that ever joined
        # Passes whose graph is alive (forward queued or awaiting backward).  An optimizer
        # step changes the adapter in place, which would corrupt those graphs, so steps
        # that come due meanwhile wait (`due`) until the last open pass is done.
        self.open_passes = 0
        self.due: set[str] = set()
        self.absent: set[int] = set()  # clients that left or vanished: rounds stop waiting for them
        self.all_joined = asyncio.Event()  # the start barrier: every expected client is in
        # Rounds are numbered by the clients; a client may join only before the job has
        # finished the round it starts at (else it would wait for a round that is over).
        self.rounds_done = -1
        self.checkpoint: _Checkpoint | None = None

    def expected(self) -> set[int]:
        """Clients a FedAvg round waits for: all of the job's, until they leave or vanish."""
        return set(range(self.spec.clients)) - self.absent


def _settings_of(msg: TrainJoin) -> TrainJoin:
    """The part of a join that all clients of a job must agree on."""
    return msg.model_copy(update={"sid": 0, "client": 0, "round": 0, "resume": None, "tensor": None})


class TrainingService:
    def __init__(self, shard: ModelShard, partition: Partition, device: str, settings: TrainingSettings | None = None):
        self.base = shard
        self.partition = partition
        self.device = device
        self.dtype = next(shard.parameters()).dtype
        self.settings = settings or TrainingSettings()
        self.jobs: dict[tuple, _Job] = {}  # by (tenant, job name)
        self.memory_used = 0
        self.members: dict[int, _Member] = {}  # by connection id
        self.steps: dict[tuple[int, int], _Group] = {}  # (conn, sid) -> group awaiting backward
        self.freed_steps = 0  # steps whose backward never came (timeout or disconnect)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedsea-train")
        self._join_lock = asyncio.Lock()

    def close(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)

    # ---- entry points (called by the websocket handler) ----------------------------------

    async def handle(self, conn: int, msg, tensor: torch.Tensor | None, tenant: int | None = None) -> tuple[Any, torch.Tensor | None]:
        """Answer one train_* request from connection `conn` of `tenant` (which API key it
        presented; None without keys): returns (reply header, reply tensor) or raises
        ProtocolError (a bug becomes an `internal` error for this request only)."""
        try:
            return await self._handle(conn, msg, tensor, tenant)
        except (ProtocolError, asyncio.CancelledError):
            raise
        except Exception as e:
            log.exception("training request %s failed", msg.type)
            raise ProtocolError(ErrorCode.INTERNAL, f"{msg.type} failed on the server: {e!r}", msg.sid) from None

    async def _handle(self, conn: int, msg, tensor: torch.Tensor | None, tenant: int | None) -> tuple[Any, torch.Tensor | None]:
        if isinstance(msg, TrainJoin):
            async with self._join_lock:  # two clients creating the same job at once
                reply, job = await self._join(conn, msg, tensor, tenant)
            try:  # start together, so the first rounds already fuse (a missing client: timeout)
                await asyncio.wait_for(job.all_joined.wait(), self.settings.aggregate_timeout)
            except TimeoutError:
                log.warning("job %r: starting with %d of %d clients", job.name, len(job.members), job.spec.clients)
            return reply, None
        member = self.members.get(conn)
        if member is None:
            raise ProtocolError(ErrorCode.UNKNOWN_JOB, "send train_join before other train messages", msg.sid)
        if isinstance(msg, TrainForward):
            return await self._forward(member, msg, tensor)
        if isinstance(msg, TrainBackward):
            return await self._backward(member, msg, tensor)
        if isinstance(msg, TrainAggregate):
            return await self._aggregate(member, msg, tensor)
        if isinstance(msg, TrainExport):
            flat = await self._run(self._export, member.job)
            return TrainState(sid=msg.sid, tensor=tensor_meta(flat)), flat
        if isinstance(msg, TrainCheckpoint):
            ckpt = member.job.checkpoint
            if ckpt is None:
                raise ProtocolError(ErrorCode.UNKNOWN_STEP, "no checkpoint kept yet: send a train_aggregate with checkpoint=true first", msg.sid)
            return TrainCheckpointState(sid=msg.sid, round=ckpt.round, adapters=ckpt.adapters, tensor=tensor_meta(ckpt.state)), ckpt.state
        if isinstance(msg, TrainLeave):
            self._remove(conn, left=True)
            return TrainLeft(sid=msg.sid), None
        raise ProtocolError(ErrorCode.BAD_FRAME, f"{msg.type!r} is not a training request", msg.sid)

    def disconnect(self, conn: int) -> None:
        """The connection is gone: free its steps, stop waiting for it."""
        self._remove(conn, left=False)

    # ---- memory budget -------------------------------------------------------------------

    def _charge(self, nbytes: int, what: str, sid: int) -> None:
        budget = self.settings.memory
        if self.memory_used + nbytes > budget:
            raise ProtocolError(ErrorCode.CAPACITY, f"{what} needs ~{nbytes / 2**20:.1f} MiB of training memory; "
                                f"{self.memory_used / 2**20:.1f} of {budget / 2**20:.1f} MiB are in use "
                                "(the server's --training-memory); retry later or use less", sid)
        self.memory_used += nbytes

    def _release(self, nbytes: int) -> None:
        self.memory_used -= nbytes

    def _job_bytes(self, msg: TrainJoin) -> int:
        """Adapters of a new job with their gradients and AdamW moments, and the copy of
        adapters and moments a checkpoint keeps (float32)."""
        c = self.base.config
        hd = head_dim(c)
        h, q, kv, ff = c.hidden_size, c.num_attention_heads * hd, c.num_key_value_heads * hd, c.intermediate_size
        dims = {"q_proj": h + q, "k_proj": h + kv, "v_proj": h + kv, "o_proj": q + h,
                "gate_proj": h + ff, "up_proj": h + ff, "down_proj": ff + h}
        per_layer = sum(msg.lora.rank * dims.get(t, h + ff) for t in msg.lora.targets)
        adapters = msg.clients if msg.mode == "hierarchical" else 1
        return 7 * 4 * per_layer * len(self.partition.server_layers) * adapters

    def _forward_bytes(self, lengths: list[int]) -> int:
        """Autograd state a forward keeps until its backward: per token and layer the
        saved activations (about 20 hidden-wide and 4 MLP-wide vectors), plus each
        sample's attention probabilities."""
        c = self.base.config
        layers, size = len(self.partition.server_layers), self.dtype.itemsize
        per_token = (20 * c.hidden_size + 4 * c.intermediate_size) * size
        attention = c.num_attention_heads * sum(n * n for n in lengths) * size
        return layers * (sum(lengths) * per_token + attention)

    # ---- join / leave --------------------------------------------------------------------

    async def _join(self, conn: int, msg: TrainJoin, tensor: torch.Tensor | None,
                    tenant: int | None) -> tuple[TrainJoined, _Job]:
        if conn in self.members:
            raise ProtocolError(ErrorCode.JOB_MISMATCH, f"this connection already joined job {self.members[conn].job.name!r}", msg.sid)
        if msg.client >= msg.clients:
            raise ProtocolError(ErrorCode.BAD_FRAME, f"client id {msg.client} is not below clients={msg.clients}", msg.sid)
        if (tensor is None) != (msg.resume is None):
            raise ProtocolError(ErrorCode.BAD_FRAME, "a join carries a tensor exactly when it carries `resume` (the server state it describes)", msg.sid)
        key = (tenant, msg.job)
        job = self.jobs.get(key)  # only this tenant's jobs: another key's job of that name is invisible
        resumed = job is not None
        if job is None:
            if msg.round > 0 and msg.resume is None:
                raise ProtocolError(ErrorCode.UNKNOWN_JOB, f"job {msg.job!r} resumes round {msg.round} but is not on this server: "
                                    "the client holding the server state must join first (retry)", msg.sid)
            nbytes = self._job_bytes(msg)
            self._charge(nbytes, f"job {msg.job!r}", msg.sid)
            try:
                shard, optimizers = await self._run(self._create_adapters, msg, tensor)
            except BaseException:
                self._release(nbytes)
                raise
            job = self.jobs[key] = _Job(key, msg.job, _settings_of(msg), shard, optimizers, nbytes)
            job.rounds_done = msg.round - 1
            if msg.mode == "hierarchical":
                self._route_rows(job)
            resumed = tensor is not None
        elif _settings_of(msg) != job.spec:
            raise ProtocolError(ErrorCode.JOB_MISMATCH, f"job {msg.job!r} runs with different settings: {job.spec.model_dump(exclude={'sid', 'client', 'round', 'resume', 'tensor'})}", msg.sid)
        elif msg.round <= job.rounds_done:
            raise ProtocolError(ErrorCode.JOB_MISMATCH, f"job {msg.job!r} has finished round {job.rounds_done}; this client starts at round "
                                f"{msg.round} (its other clients are still on it: stop them, then resume all from one checkpoint)", msg.sid)
        if msg.client in job.members:
            raise ProtocolError(ErrorCode.JOB_MISMATCH, f"client {msg.client} of job {msg.job!r} is already connected", msg.sid)
        member = _Member(conn, msg.client, job)
        self.members[conn] = member
        job.members[msg.client] = member
        job.joined.add(msg.client)
        job.absent.discard(msg.client)
        if len(job.joined) >= msg.clients:
            job.all_joined.set()
        params = sum(p.numel() for p in lora_parameters(job.shard, member.adapter).values())
        log.info("client %d joined training job %r (%s, %d/%d clients)", msg.client, msg.job, msg.mode, len(job.members), msg.clients)
        return TrainJoined(sid=msg.sid, job=msg.job, params=params, resumed=resumed), job

    def _create_adapters(self, msg: TrainJoin, state: torch.Tensor | None) -> tuple[ModelShard, dict[str, AdapterOptimizer]]:
        with torch.device("meta"):
            shard = ModelShard(self.base.config, list(self.partition.server_layers), with_edge_parts=False)
        # The job's shard holds the same base tensors as the inference shard: no copy.
        shard.load_state_dict(self.base.state_dict(), assign=True)
        shard.rotary = self.base.rotary
        shard.requires_grad_(False).train()
        names = [f"c{i}" for i in range(msg.clients)] if msg.mode == "hierarchical" else [SHARED]
        layers = list(self.partition.server_layers)
        # Sequential mode steps the shared adapter once per client step.
        total = msg.optim.total_steps * (msg.clients if msg.mode == "sequential" else 1)
        for name in names:
            inject_lora(shard, msg.lora, layers, name, seed=msg.seed + 1)  # same init for all clients
        shard.to(self.device)
        optimizers = {name: AdapterOptimizer(lora_parameters(shard, name), msg.optim, total) for name in names}
        if state is not None:
            self._check_resume(msg, state, optimizers, total)
            for entry, rows in zip(msg.resume, state):
                optimizers[entry.name].restore_state(entry.steps, entry.micro, rows)
        return shard, optimizers

    def _check_resume(self, msg: TrainJoin, state: torch.Tensor, optimizers: dict[str, AdapterOptimizer], total: int) -> None:
        """An uploaded server state is hostile input: exactly this job's adapters, shapes
        and dtype, finite, second moments >= 0, counters within the schedule."""
        names = [entry.name for entry in msg.resume]
        if names != list(optimizers):
            raise ProtocolError(ErrorCode.BAD_TENSOR, f"resume names adapters {names}; this job has {list(optimizers)}", msg.sid)
        params = list(next(iter(optimizers.values())).params.values())
        expected = [len(names), 3, sum(p.numel() for p in params)]
        if state.dtype != torch.float32 or list(state.shape) != expected:
            raise ProtocolError(ErrorCode.BAD_TENSOR, f"resume state must be float32{expected}, got {str(state.dtype).removeprefix('torch.')}{list(state.shape)}", msg.sid)
        self._check_finite(msg, state.to(params[0].dtype))
        if (state[:, 2] < 0).any():
            raise ProtocolError(ErrorCode.BAD_TENSOR, "resume state has negative second moments", msg.sid)
        for entry in msg.resume:
            if entry.steps > total or entry.micro > total * msg.optim.grad_accum:
                raise ProtocolError(ErrorCode.BAD_FRAME, f"adapter {entry.name!r} resumes at step {entry.steps} (micro-batch {entry.micro}) "
                                    f"of a {total}-step schedule", msg.sid)

    @staticmethod
    def _route_rows(job: _Job) -> None:
        """Hierarchical mode: every LoRA layer picks each row's adapter (peft's mixed-batch
        path) from the list the current pass set."""

        def pre_hook(module, args, kwargs):
            if job.row_adapters is not None:
                kwargs["adapter_names"] = job.row_adapters
            return args, kwargs

        for module in job.shard.modules():
            if hasattr(module, "lora_A"):
                module.register_forward_pre_hook(pre_hook, with_kwargs=True)

    def _remove(self, conn: int, left: bool) -> None:
        member = self.members.pop(conn, None)
        if member is None:
            return
        job = member.job
        job.members.pop(member.client, None)
        job.absent.add(member.client)
        for p in [p for p in job.pending if p.member is member]:
            job.pending.remove(p)
            p.reply.cancel()
        for key in [k for k in self.steps if k[0] == conn]:
            group = self.steps.pop(key)
            group.gone.add(key)
            self._maybe_finish(group)
        for number, rnd in list(job.rounds.items()):
            self._maybe_finish_round(job, number, rnd)
        if job.pending and len(job.pending) >= len(job.members):
            self._flush(job)
        if not job.members and self.jobs.get(job.key) is job:  # its last client: free the job
            del self.jobs[job.key]
            self._release(job.nbytes)
        log.info("client %d %s training job %r", member.client, "left" if left else "disconnected from", job.name)

    # ---- forward -------------------------------------------------------------------------

    def _check_hidden(self, msg, tensor: torch.Tensor, rows: int) -> None:
        hidden = self.base.config.hidden_size
        if tensor.dim() != 2 or tensor.shape != (rows, hidden):
            raise ProtocolError(ErrorCode.BAD_TENSOR, f"expected a [{rows}, {hidden}] tensor, got {list(tensor.shape)}", msg.sid)
        self._check_finite(msg, tensor.to(self.dtype))

    @staticmethod
    def _check_finite(msg, tensor: torch.Tensor) -> None:
        """`tensor` as the server will compute with it (3.4e38 is Inf in bfloat16)."""
        if not torch.isfinite(tensor).all():
            raise ProtocolError(ErrorCode.NON_FINITE, "tensor contains NaN or Inf", msg.sid)

    async def _forward(self, member: _Member, msg: TrainForward, tensor: torch.Tensor) -> tuple[TrainOutput, torch.Tensor]:
        rows = sum(msg.lengths)
        if rows > self.settings.max_tokens:
            raise ProtocolError(ErrorCode.TOO_LARGE, f"{rows} tokens exceed the server's limit of {self.settings.max_tokens} per train_forward", msg.sid)
        longest, limit = max(msg.lengths, default=0), context_limit(self.base.config)
        if longest > limit:  # past a sliding window the blocks would attend too far
            raise ProtocolError(ErrorCode.TOO_LARGE, f"a sequence of {longest} tokens exceeds the model's context of {limit}", msg.sid)
        self._check_hidden(msg, tensor, rows)
        if (member.conn, msg.sid) in self.steps:
            raise ProtocolError(ErrorCode.SESSION_EXISTS, f"step {msg.sid} is already waiting for its backward", msg.sid)
        job = member.job
        if not msg.backward:
            out = await self._run(self._eval_forward, job, member.adapter, msg.lengths, tensor)
            out = out.to(tensor.dtype)
            return TrainOutput(sid=msg.sid, tensor=tensor_meta(out)), out
        nbytes = self._forward_bytes(msg.lengths)
        self._charge(nbytes, f"a forward of {rows} tokens", msg.sid)
        if job.spec.mode == "sequential":
            try:
                await job.turn.acquire()  # released when this step's backward is done or freed
            except BaseException:
                self._release(nbytes)
                raise
        pending = _Pending(member, msg.sid, msg.lengths, tensor, asyncio.get_running_loop().create_future(), nbytes)
        job.pending.append(pending)
        if job.spec.mode == "sequential" or len(job.pending) >= len(job.members):
            self._flush(job)
        elif job.flush_timer is None:
            wait = self.settings.batched_wait if job.spec.mode == "batched" else self.settings.fuse_window
            job.flush_timer = asyncio.get_running_loop().call_later(wait, self._flush_late, job)
        try:
            out = await pending.reply
        except asyncio.CancelledError:
            if not pending.flushed:  # else its pass owns the turn and the charge
                self._release(nbytes)
                if job.spec.mode == "sequential":
                    job.turn.release()
            raise
        return TrainOutput(sid=msg.sid, tensor=tensor_meta(out)), out

    def _flush_late(self, job: _Job) -> None:
        if job.spec.mode == "batched":
            log.warning("job %r: a batched pass runs with %d of %d clients' forwards after waiting %gs for the others",
                        job.name, len(job.pending), len(job.members), self.settings.batched_wait)
        self._flush(job)

    def _flush(self, job: _Job) -> None:
        if job.flush_timer is not None:
            job.flush_timer.cancel()
            job.flush_timer = None
        batch, job.pending = job.pending, []
        for p in batch:
            p.flushed = True
        if batch:
            job.open_passes += 1
            asyncio.get_running_loop().create_task(self._run_group(job, batch))

    async def _run_group(self, job: _Job, batch: list[_Pending]) -> None:
        try:
            inp, out = await self._run(self._group_forward, job, batch)
        except Exception as e:  # a model failure fails these steps, not the server
            log.exception("training forward failed")
            for p in batch:
                if not p.reply.done():
                    p.reply.set_exception(ProtocolError(ErrorCode.INTERNAL, f"server forward failed: {e}", p.sid))
            job.open_passes -= 1
            self._release(sum(p.nbytes for p in batch))
            if job.spec.mode == "sequential":
                job.turn.release()
            return
        rows, adapter_of, samples, start = {}, {}, {}, 0
        for p in batch:
            n = sum(p.lengths)
            rows[(p.member.conn, p.sid)] = slice(start, start + n)
            adapter_of[(p.member.conn, p.sid)] = p.member.adapter
            samples[(p.member.conn, p.sid)] = len(p.lengths)
            start += n
        group = _Group(job, rows, adapter_of, inp, out, samples, sum(p.nbytes for p in batch))
        group.timer = asyncio.get_running_loop().call_later(self.settings.step_timeout, self._expire, group)
        for p in batch:
            key = (p.member.conn, p.sid)
            if p.reply.done() or self.members.get(p.member.conn) is not p.member:  # left meanwhile
                group.gone.add(key)
                continue
            self.steps[key] = group
            p.reply.set_result(out[rows[key]].detach().to("cpu", p.hidden.dtype))
        self._maybe_finish(group)

    def _group_forward(self, job: _Job, batch: list[_Pending]) -> tuple[torch.Tensor, torch.Tensor]:
        lengths = [n for p in batch for n in p.lengths]
        inp = torch.cat([p.hidden for p in batch]).to(self.device, self.dtype).requires_grad_()
        if job.spec.mode == "hierarchical":
            job.row_adapters = [p.member.adapter for p in batch for _ in range(sum(p.lengths))]
        try:
            positions = packed_positions(lengths, self.device)
            out = job.shard.run_blocks(self.partition.server_layers, inp, positions, packed_attention(lengths))
        finally:
            job.row_adapters = None
        return inp, out

    @torch.no_grad()
    def _eval_forward(self, job: _Job, adapter: str, lengths: list[int], hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden.to(self.device, self.dtype)
        if job.spec.mode == "hierarchical":
            job.row_adapters = [adapter] * hidden.shape[0]
        job.shard.eval()  # no LoRA dropout in validation
        try:
            positions = packed_positions(lengths, self.device)
            return job.shard.run_blocks(self.partition.server_layers, hidden, positions, packed_attention(lengths)).cpu()
        finally:
            job.shard.train()
            job.row_adapters = None

    # ---- backward ------------------------------------------------------------------------

    async def _backward(self, member: _Member, msg: TrainBackward, tensor: torch.Tensor) -> tuple[TrainGrad, torch.Tensor]:
        key = (member.conn, msg.sid)
        group = self.steps.get(key)
        if group is None:
            raise ProtocolError(ErrorCode.UNKNOWN_STEP, f"step {msg.sid} has no forward waiting for a backward (never sent, already done, or freed after {self.settings.step_timeout:g}s)", msg.sid)
        rows = group.rows[key]
        self._check_hidden(msg, tensor, rows.stop - rows.start)
        del self.steps[key]
        reply = asyncio.get_running_loop().create_future()
        group.grads[key] = tensor
        group.waiters[key] = reply
        self._maybe_finish(group)
        grad, stepped = await reply
        member.samples += group.samples[key]  # what FedAvg weighs this client by
        return TrainGrad(sid=msg.sid, stepped=stepped, tensor=tensor_meta(grad)), grad

    def _maybe_finish(self, group: _Group) -> None:
        if group.complete() and not group.finishing:
            group.finishing = True
            if group.timer is not None:
                group.timer.cancel()
            asyncio.get_running_loop().create_task(self._finish(group))

    async def _finish(self, group: _Group) -> None:
        job = group.job
        for key in group.rows:
            if self.steps.get(key) is group:
                del self.steps[key]
        try:
            if group.grads:
                grads, stepped = await self._run(self._group_backward, group, job.open_passes == 1)
                for key, reply in group.waiters.items():
                    if not reply.done():
                        reply.set_result((grads[group.rows[key]].to("cpu", group.grads[key].dtype), stepped))
            elif job.open_passes == 1 and job.due:  # the last open pass was abandoned
                await self._run(self._step_due, job)
            if group.gone:
                self.freed_steps += len(group.gone)
                log.warning("job %r: freed %d step(s) whose client never sent the backward", job.name, len(group.gone))
        except Exception as e:
            log.exception("training backward failed")
            for key, reply in group.waiters.items():
                if not reply.done():
                    reply.set_exception(ProtocolError(ErrorCode.INTERNAL, f"server backward failed: {e}", key[1]))
        finally:
            job.open_passes -= 1
            group.inp = group.out = None  # drop the autograd graph
            self._release(group.nbytes)
            if job.spec.mode == "sequential" and job.turn.locked():
                job.turn.release()

    def _group_backward(self, group: _Group, may_step: bool) -> tuple[torch.Tensor, bool]:
        job = group.job
        grad = torch.zeros_like(group.out)
        for key, g in group.grads.items():
            grad[group.rows[key]] = g.to(grad.device, grad.dtype)
        # One shared adapter sees the sum of the fused clients' gradients: average it, so a
        # fused step is as large as one client's (the input gradients are unscaled below).
        scale = len(group.rows) if job.spec.mode == "batched" else 1
        group.out.backward(grad / scale)
        inp_grad = group.inp.grad * scale
        for name in {group.adapter_of[k] for k in group.grads}:
            if job.optimizers[name].accumulate():
                job.due.add(name)
        return inp_grad, may_step and self._step_due(job)

    @staticmethod
    def _step_due(job: _Job) -> bool:
        stepped = bool(job.due)
        for name in sorted(job.due):
            job.optimizers[name].step()
        job.due.clear()
        return stepped

    def _expire(self, group: _Group) -> None:
        """step_timeout passed: members without a backward count as gone."""
        group.gone.update(k for k in group.rows if k not in group.grads)
        self._maybe_finish(group)

    # ---- FedAvg --------------------------------------------------------------------------

    async def _aggregate(self, member: _Member, msg: TrainAggregate, tensor: torch.Tensor) -> tuple[TrainAggregated, torch.Tensor]:
        job = member.job
        if tensor.dim() != 1:
            raise ProtocolError(ErrorCode.BAD_TENSOR, f"an adapter vector is 1-D, got shape {list(tensor.shape)}", msg.sid)
        if not torch.isfinite(tensor).all():
            raise ProtocolError(ErrorCode.NON_FINITE, "adapter vector contains NaN or Inf", msg.sid)
        if msg.round <= job.rounds_done:
            raise ProtocolError(ErrorCode.JOB_MISMATCH, f"round {msg.round} of job {job.name!r} is over (it is at round {job.rounds_done})", msg.sid)
        rnd = job.rounds.setdefault(msg.round, _Round())
        for _, other, _ in rnd.contributions.values():
            if other.shape != tensor.shape:
                raise ProtocolError(ErrorCode.BAD_TENSOR, f"adapter vector of {tensor.numel()} values, other clients sent {other.numel()}", msg.sid)
        if member.client in rnd.contributions:
            raise ProtocolError(ErrorCode.SESSION_EXISTS, f"client {member.client} already sent round {msg.round}", msg.sid)
        reply = asyncio.get_running_loop().create_future()
        # Weighed by the samples the server trained for this client, not msg.samples.
        rnd.contributions[member.client] = (member.samples, tensor.float(), reply)
        rnd.checkpoint |= msg.checkpoint
        member.samples = 0
        if rnd.timer is None:
            rnd.timer = asyncio.get_running_loop().call_later(
                self.settings.aggregate_timeout, self._finish_round, job, msg.round, rnd
            )
        self._maybe_finish_round(job, msg.round, rnd)
        avg, clients = await reply
        return TrainAggregated(sid=msg.sid, round=msg.round, clients=clients, tensor=tensor_meta(avg)), avg

    def _maybe_finish_round(self, job: _Job, number: int, rnd: _Round) -> None:
        if rnd.contributions and job.expected() <= set(rnd.contributions):
            self._finish_round(job, number, rnd)

    def _finish_round(self, job: _Job, number: int, rnd: _Round) -> None:
        if job.rounds.pop(number, None) is None:
            return
        if rnd.timer is not None:
            rnd.timer.cancel()
        job.rounds_done = max(job.rounds_done, number)
        live = {c: v for c, v in rnd.contributions.items() if not v[2].done()}
        if not live:
            return
        asyncio.get_running_loop().create_task(self._average(job, number, rnd.checkpoint, live))

    async def _average(self, job: _Job, number: int, checkpoint: bool,
                       live: dict[int, tuple[int, torch.Tensor, asyncio.Future]]) -> None:
        total = sum(n for n, _, _ in live.values())
        # No client trained since the last round (the start line): an equal average.
        weights = {c: n / total if total else 1 / len(live) for c, (n, _, _) in live.items()}
        avg = sum(weights[c] * vec for c, (_, vec, _) in live.items())
        if job.spec.mode == "hierarchical":
            await self._run(self._average_server_adapters, job, weights)
        if checkpoint:  # before any reply: the clients are all waiting, no step is open
            job.checkpoint = await self._run(self._take_checkpoint, job, number)
        for _, _, reply in live.values():
            if not reply.done():
                reply.set_result((avg, len(live)))

    @staticmethod
    def _average_server_adapters(job: _Job, weights: dict[int, float]) -> None:
        flats = {c: flatten(lora_parameters(job.shard, f"c{c}")) for c in weights}
        avg = sum(weights[c] * flats[c] for c in weights)
        for name in job.optimizers:
            load_flat(lora_parameters(job.shard, name), avg)

    @staticmethod
    def _take_checkpoint(job: _Job, number: int) -> _Checkpoint:
        adapters = [AdapterState(name=name, steps=opt.steps, micro=opt.micro) for name, opt in job.optimizers.items()]
        return _Checkpoint(number, adapters, torch.stack([opt.export_state() for opt in job.optimizers.values()]).cpu())

    def _export(self, job: _Job) -> torch.Tensor:
        flats = [flatten(lora_parameters(job.shard, name)) for name in job.optimizers]
        return sum(flats) / len(flats)
