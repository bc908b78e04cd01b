"""The wire protocol between edge and server: one websocket, binary frames, many sessions.

Frame layout (every message, both directions):

    [u32 big-endian: header length N][N bytes: orjson header][payload: raw tensor bytes]

The header is one of the pydantic models below (its `type` field selects which).  A
header whose `tensor` field is set is followed by exactly prod(shape) * itemsize bytes in
row-major order; nothing else is ever on the wire: no pickle, no torch.load, no masks, no
KV tensors, no token ids.  docs/protocol.md documents each message.
"""

from __future__ import annotations

import math
import struct
from enum import Enum
from typing import Annotated, Literal, Union

import orjson
import torch
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

PROTOCOL_VERSION = 6  # docs/protocol.md lists what each version changed
MAX_PREFIX_KEYS = 384  # block keys an Open may name (32 hex digits each; fits the header limit)
MAX_PARTIAL_ROWS = 63  # row digests an Open may name after them (32 hex digits each; with 384 keys the header still fits)
MAX_HEADER_BYTES = 16 * 1024
MAX_STEP_SESSIONS = 256  # sessions one Step frame may carry
# Bounds on a Step header's JSON: the type, a 2-d tensor shape and the brackets, plus one
# [sid, pos, n] entry per session (ints < 2**53: at most 16 digits each).
STEP_HEADER_BYTES = 128
STEP_ENTRY_BYTES = 56

WIRE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


class ErrorCode(str, Enum):
    BAD_FRAME = "bad_frame"  # not a frame, unparsable header, unknown type, bad field
    BAD_TENSOR = "bad_tensor"  # wrong shape or dtype, payload size mismatch
    NON_FINITE = "non_finite"  # NaN or Inf in a hidden state
    TOO_LARGE = "too_large"  # message over the negotiated max_message_bytes
    VERSION = "version"  # protocol version mismatch
    NOT_READY = "not_ready"  # a session message before the hello handshake
    PARTITION_MISMATCH = "partition_mismatch"  # edge and server disagree on the split
    UNKNOWN_SESSION = "unknown_session"
    SESSION_EXISTS = "session_exists"
    SESSION_BUSY = "session_busy"  # a step while the previous one is still running
    POSITION_MISMATCH = "position_mismatch"  # step.pos differs from the server's length
    CONTEXT_OVERFLOW = "context_overflow"  # session would exceed max_context
    NOISE_OUT_OF_BOUNDS = "noise_out_of_bounds"
    LIMIT = "limit"  # too many sessions on this connection
    CAPACITY = "capacity"  # a step larger than the whole KV pool, or no blocks came free in time: retry later
    # The server took this session's KV blocks for an older session (preemption by
    # recompute): reopen it (Open.reopen, naming its prefix in Open.prefix) and send its
    # states again from Opened.cached; the server runs the re-sent step once it fits.
    PREEMPTED = "preempted"
    INTERNAL = "internal"
    UNKNOWN_ADAPTER = "unknown_adapter"  # open names an adapter the server does not serve
    DISABLED = "disabled"  # a feature this server was not started with (training: --enable-training)
    # split fine-tuning (train_* messages)
    UNKNOWN_JOB = "unknown_job"  # a train message before train_join on this connection
    JOB_MISMATCH = "job_mismatch"  # joining a job with different settings, or a taken client id
    UNKNOWN_STEP = "unknown_step"  # backward for a step never forwarded, or freed on timeout


class TensorMeta(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dtype: Literal["float32", "float16", "bfloat16"]
    shape: list[Annotated[int, Field(ge=0)]]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * WIRE_DTYPES[self.dtype].itemsize


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---- edge -> server ------------------------------------------------------------------


class Hello(_Message):
    """First message on a connection: which cut of which model the edge runs."""

    type: Literal["hello"] = "hello"
    v: int = PROTOCOL_VERSION
    num_layers: int
    hidden_size: int
    layers: tuple[int, int]  # the server range [start, end) the edge expects
    dtype: Literal["float32", "float16", "bfloat16"]  # wire dtype of hidden states


class Open(_Message):
    """Open a session (one sequence).  `noise` is the scale the edge applies (relative
    to per-token RMS); the server refuses one outside its bounds.  `adapter` picks a
    fine-tuned adapter the server serves (one of `Welcome.adapters`); None: the base model.
    `prefix`: the block keys (fedsea_shared.prefix, hex) of hidden states the edge sent
    before and is about to send again; `partial`: the row digests (hex) of fewer than
    `Welcome.block_size` such states after those blocks, which a cached block may start
    with.  `Opened.cached` says how many tokens of them the server still holds (whole
    blocks of `prefix`, then all of `partial` or none), and the first Step starts there.  `reopen`: `sid` is open and the
    server preempted it (ErrorCode.PREEMPTED); it takes up its cached prefix again and keeps
    its place in the order the server serves sessions (its adapter cannot change)."""

    type: Literal["open"] = "open"
    sid: Annotated[int, Field(ge=0, lt=2**53)]
    noise: Annotated[float, Field(ge=0)]
    adapter: Annotated[str, Field(max_length=128)] | None = None
    prefix: Annotated[list[Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]], Field(max_length=MAX_PREFIX_KEYS)] | None = None
    partial: Annotated[list[Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]], Field(max_length=MAX_PARTIAL_ROWS)] | None = None
    reopen: bool = False


class Fork(_Message):
    """Open session `sid` as a copy of the idle session `parent` (its tokens so far, its
    adapter and noise): n choices of one prompt share its prefill and KV blocks."""

    type: Literal["fork"] = "fork"
    sid: Annotated[int, Field(ge=0, lt=2**53)]
    parent: int


SessionRows = tuple[Annotated[int, Field(ge=0, lt=2**53)], Annotated[int, Field(ge=0)], Annotated[int, Field(ge=1)]]


class _Rows(_Message):
    """Rows of many sessions in one tensor: `rows[i] = (sid, pos, n)` says the next n rows
    are session sid's hidden states at positions [pos, pos + n), in the order listed."""

    rows: Annotated[list[SessionRows], Field(min_length=1, max_length=MAX_STEP_SESSIONS)]
    tensor: TensorMeta

    @model_validator(mode="after")
    def _one_run_per_session(self):
        sids = [sid for sid, _, _ in self.rows]
        if len(set(sids)) != len(sids):
            raise ValueError("a session appears twice in one frame")
        return self

    def tensor_mismatch(self) -> str | None:
        """Why the tensor cannot hold these rows, if it cannot."""
        total = sum(n for _, _, n in self.rows)
        if len(self.tensor.shape) != 2 or self.tensor.shape[0] != total:
            return f"the rows add up to {total} but the tensor's shape is {self.tensor.shape}"
        return None

    @property
    def sids(self) -> list[int]:
        return [sid for sid, _, _ in self.rows]

    def split(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        return list(tensor.split([n for _, _, n in self.rows]))


class Step(_Rows):
    """The next hidden states of one or many sessions: a decode step of every generation
    the edge runs carries one row each, a prompt (or a replay) its whole run.  Tensor:
    [sum of n, hidden_size]."""

    type: Literal["step"] = "step"


class Close(_Message):
    type: Literal["close"] = "close"
    sid: int


# ---- server -> edge ------------------------------------------------------------------


class Load(_Message):
    """What a server runtime reports of its own load, for an edge choosing among replicas
    (edge_runtime.servers): its open sessions (of every edge), the steps and opens waiting
    for KV blocks or a tenant's quota, and its KV pool's free (or evictable) and total blocks.
    A claim, not a fact: an edge counts its own sessions and never takes the figure as
    less load than that."""

    sessions: Annotated[int, Field(ge=0, lt=2**53)]
    waiting: Annotated[int, Field(ge=0, lt=2**53)]
    free_blocks: Annotated[int, Field(ge=0, lt=2**53)]
    blocks: Annotated[int, Field(ge=1, lt=2**53)]

    @model_validator(mode="after")
    def _fits(self) -> "Load":
        if self.free_blocks > self.blocks:
            raise ValueError(f"{self.free_blocks} free blocks of {self.blocks}")
        return self


class Welcome(_Message):
    type: Literal["welcome"] = "welcome"
    v: int = PROTOCOL_VERSION
    layers: tuple[int, int]
    dtype: Literal["float32", "float16", "bfloat16"]
    noise_min: float
    noise_max: float
    max_context: int
    max_sessions: int  # per connection
    max_message_bytes: int
    block_size: int  # tokens per KV block: the granularity of prefix-cache hits
    # Fine-tuned adapters a session may open with, by name; None (left off the wire, so
    # edges that predate adapters still parse the welcome) when the server serves none.
    adapters: list[str] | None = None
    load: Load | None = None


class Opened(_Message):
    """Reply to Open and Fork: the session holds `cached` tokens (a prefix-cache hit, or
    the parent's length); the next Step must start at that position."""

    type: Literal["opened"] = "opened"
    sid: int
    cached: int = 0
    load: Load | None = None  # the server's load after opening it


class Output(_Rows):
    """The middle blocks' output for the rows of sessions whose steps finished in the same
    tick (those of one Step frame, or part of them).  Tensor: [sum of n, hidden_size]."""

    type: Literal["output"] = "output"


class Closed(_Message):
    type: Literal["closed"] = "closed"
    sid: int
    load: Load | None = None  # the server's load after closing it


class Error(_Message):
    """A refused message.  `sid` names the session it concerns, if any; `fatal` means
    the server closes the connection after sending it."""

    type: Literal["error"] = "error"
    code: ErrorCode
    message: str
    sid: int | None = None
    fatal: bool = False


# ---- split fine-tuning (both directions) ------------------------------------------------
# One connection is one client of one training job.  Every request carries a `sid` that is
# unique among the connection's requests in flight; the reply (or an Error) carries it back.


class LoraSpec(_Message):
    """LoRA adapter shape, the same on the edge's and the server's blocks."""

    rank: Annotated[int, Field(ge=1, le=512)] = 8
    alpha: Annotated[float, Field(gt=0)] = 16.0
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")


class OptimSpec(_Message):
    """AdamW settings; the server applies them to its own adapter."""

    lr: Annotated[float, Field(gt=0)] = 1e-4
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    schedule: Literal["constant", "linear", "cosine"] = "linear"
    warmup_steps: Annotated[int, Field(ge=0)] = 0
    total_steps: Annotated[int, Field(ge=1)] = 1000  # optimizer steps of one client
    grad_clip: Annotated[float, Field(ge=0)] = 1.0  # max global norm; 0 = off
    grad_accum: Annotated[int, Field(ge=1)] = 1  # micro-batches per optimizer step


TrainMode = Literal["sequential", "batched", "hierarchical"]


class AdapterState(_Message):
    """Counters of one server adapter's optimizer in a TrainCheckpointState or a resuming
    TrainJoin; its tensors are that message's tensor[i] for the i-th adapter."""

    name: Annotated[str, Field(max_length=64)]
    steps: Annotated[int, Field(ge=0)]  # optimizer steps taken (sets the LR schedule)
    micro: Annotated[int, Field(ge=0)]  # micro-batches counted toward gradient accumulation


class TrainJoin(_Message):
    """Join training job `job` as client `client` (creating the job if it is new).  All
    clients of a job must send the same mode/lora/optim/seed.  `round` > 0: the client
    resumes a checkpoint taken at that FedAvg round.  A job created by a resuming join
    needs the server's half of the checkpoint: `resume` (one entry per server adapter)
    with tensor [adapters, 3, values] float32 (adapter, AdamW exp_avg, exp_avg_sq, each flat
    in the adapter's sorted parameter order), as a TrainCheckpointState carried them."""

    type: Literal["train_join"] = "train_join"
    sid: int
    job: Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]{1,64}$")]
    client: Annotated[int, Field(ge=0, lt=4096)]
    clients: Annotated[int, Field(ge=1, le=4096)]  # how many clients the job expects
    mode: TrainMode = "sequential"
    lora: LoraSpec = LoraSpec()
    optim: OptimSpec = OptimSpec()
    seed: int = 0
    round: Annotated[int, Field(ge=0)] = 0
    resume: list[AdapterState] | None = None
    tensor: TensorMeta | None = None


class TrainJoined(_Message):
    type: Literal["train_joined"] = "train_joined"
    sid: int
    job: str
    params: int  # size of the server adapter (values of the flat vector)
    resumed: bool  # the job already existed on the server


class TrainForward(_Message):
    """Hidden states of a packed batch after the edge's head blocks (noise added).  Sample i
    owns the next lengths[i] rows; its positions are 0..lengths[i]-1.  No mask is sent: the
    server rebuilds each sample's causal mask from its length.  `backward=False` is a
    validation pass: the server keeps no state for it.  Tensor: [sum(lengths), hidden]."""

    type: Literal["train_forward"] = "train_forward"
    sid: int
    lengths: list[Annotated[int, Field(ge=1)]]
    backward: bool = True
    tensor: TensorMeta


class TrainOutput(_Message):
    """The middle blocks' output for a TrainForward.  Tensor: [tokens, hidden]."""

    type: Literal["train_output"] = "train_output"
    sid: int
    tensor: TensorMeta


class TrainBackward(_Message):
    """The loss gradient at the edge's tail input for step `sid` (the sid of its
    TrainForward).  Tensor: [tokens, hidden]."""

    type: Literal["train_backward"] = "train_backward"
    sid: int
    tensor: TensorMeta


class TrainGrad(_Message):
    """The gradient at the server's input for step `sid`; `stepped` says whether the
    server adapter took an optimizer step with it.  Tensor: [tokens, hidden]."""

    type: Literal["train_grad"] = "train_grad"
    sid: int
    stepped: bool
    tensor: TensorMeta


class TrainAggregate(_Message):
    """FedAvg round `round`: this client's edge adapter (flat float32 tensor), weighted by
    the samples it trained on since the last round.  The reply comes when every client of
    the job has sent its round (or the server's timeout drops the missing ones)."""

    type: Literal["train_aggregate"] = "train_aggregate"
    sid: int
    round: Annotated[int, Field(ge=0)]
    samples: Annotated[int, Field(ge=1)]
    checkpoint: bool = False  # keep the server's state as of this round for a train_checkpoint
    tensor: TensorMeta


class TrainAggregated(_Message):
    """The sample-weighted average edge adapter of a round (hierarchical mode averages the
    clients' server adapters the same way at the same time)."""

    type: Literal["train_aggregated"] = "train_aggregated"
    sid: int
    round: int
    clients: int  # how many clients the average covers
    tensor: TensorMeta


class TrainExport(_Message):
    """Ask for the server adapter (to save with a checkpoint or the final adapter)."""

    type: Literal["train_export"] = "train_export"
    sid: int


class TrainState(_Message):
    """The server adapter as a flat float32 vector, in the order of the adapter's
    parameter names (sorted).  Hierarchical mode sends the clients' average."""

    type: Literal["train_state"] = "train_state"
    sid: int
    tensor: TensorMeta


class TrainCheckpoint(_Message):
    """Ask for the server's half of a checkpoint: its state as of the last round that a
    TrainAggregate with `checkpoint` finished."""

    type: Literal["train_checkpoint"] = "train_checkpoint"
    sid: int


class TrainCheckpointState(_Message):
    """The job's server adapters with their optimizer state at `round` (the layout of
    TrainJoin's `resume`).  Tensor: [adapters, 3, values] float32."""

    type: Literal["train_checkpoint_state"] = "train_checkpoint_state"
    sid: int
    round: int
    adapters: list[AdapterState]
    tensor: TensorMeta


class TrainLeave(_Message):
    """This client is done: batched rounds and FedAvg stop waiting for it."""

    type: Literal["train_leave"] = "train_leave"
    sid: int


class TrainLeft(_Message):
    type: Literal["train_left"] = "train_left"
    sid: int


TRAINING_REQUESTS = (TrainJoin, TrainForward, TrainBackward, TrainAggregate, TrainExport, TrainCheckpoint, TrainLeave)


Message = Annotated[
    Union[
        Hello, Open, Fork, Step, Close, Welcome, Opened, Output, Closed, Error,
        TrainJoin, TrainJoined, TrainForward, TrainOutput, TrainBackward, TrainGrad,
        TrainAggregate, TrainAggregated, TrainExport, TrainState, TrainCheckpoint, TrainCheckpointState,
        TrainLeave, TrainLeft,
    ],
    Field(discriminator="type"),
]
_MESSAGE = TypeAdapter(Message)


class ProtocolError(Exception):
    """A message that cannot be accepted; carries what the peer should be told.  `sid`: the
    session it concerns, or the sessions of a many-session frame (each is told)."""

    def __init__(self, code: ErrorCode, message: str, sid: int | list[int] | None = None):
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message
        self.sid = sid

    def to_messages(self, fatal: bool = False) -> list[Error]:
        sids = self.sid if isinstance(self.sid, list) else [self.sid]
        return [Error(code=self.code, message=self.message, sid=sid, fatal=fatal) for sid in sids or [None]]


def _sids_of(raw) -> int | list[int] | None:
    """The sessions an unparsable frame names, so each of them can be told why it failed."""
    if not isinstance(raw, dict):
        return None
    if isinstance(raw.get("sid"), int):
        return raw["sid"]
    rows = raw.get("rows")
    if isinstance(rows, list) and len(rows) <= MAX_STEP_SESSIONS:
        sids = {r[0] for r in rows if isinstance(r, list) and r and isinstance(r[0], int) and not isinstance(r[0], bool)}
        return sorted(sids) or None
    return None


def step_frame_bytes(rows: int, row_bytes: int, sessions: int) -> int:
    """The most a Step frame of `sessions` sessions and `rows` hidden states can take."""
    return 4 + STEP_HEADER_BYTES + sessions * STEP_ENTRY_BYTES + rows * row_bytes


def max_step_rows(max_message_bytes: int, row_bytes: int) -> int:
    """How many hidden states of `row_bytes` each a Step frame of one session may carry
    under a server's `Welcome.max_message_bytes` (longer histories go as several Steps)."""
    rows = (max_message_bytes - step_frame_bytes(0, row_bytes, 1)) // row_bytes
    if rows < 1:
        raise ValueError(f"the server's max_message_bytes ({max_message_bytes}) cannot carry one {row_bytes}-byte hidden state")
    return rows


def tensor_meta(t: torch.Tensor) -> TensorMeta:
    for name, dt in WIRE_DTYPES.items():
        if t.dtype == dt:
            return TensorMeta(dtype=name, shape=list(t.shape))
    raise ValueError(f"dtype {t.dtype} cannot go on the wire")


def encode(message: _Message, tensor: torch.Tensor | None = None) -> bytes:
    header = orjson.dumps(message.model_dump(mode="json", exclude_none=True))
    if tensor is None:
        return struct.pack(">I", len(header)) + header
    payload = tensor.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()
    return struct.pack(">I", len(header)) + header + payload


def decode(data: bytes | str) -> tuple[_Message, torch.Tensor | None]:
    """Parse one frame; raise ProtocolError (never anything else) on malformed input."""
    if isinstance(data, str):
        raise ProtocolError(ErrorCode.BAD_FRAME, "text frames are not accepted; send binary frames")
    if len(data) < 4:
        raise ProtocolError(ErrorCode.BAD_FRAME, f"frame of {len(data)} bytes is shorter than its length prefix")
    (n,) = struct.unpack_from(">I", data)
    if n > MAX_HEADER_BYTES or 4 + n > len(data):
        raise ProtocolError(ErrorCode.BAD_FRAME, f"header length {n} does not fit the {len(data)}-byte frame")
    try:
        raw = orjson.loads(data[4 : 4 + n])
    except orjson.JSONDecodeError as e:
        raise ProtocolError(ErrorCode.BAD_FRAME, f"header is not JSON: {e}") from None
    sid = _sids_of(raw)
    try:
        message = _MESSAGE.validate_python(raw)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ProtocolError(ErrorCode.BAD_FRAME, f"invalid header at {where or 'top level'}: {first['msg']}", sid) from None
    payload = memoryview(data)[4 + n :]
    meta: TensorMeta | None = getattr(message, "tensor", None)
    if meta is None:
        if len(payload):
            raise ProtocolError(ErrorCode.BAD_FRAME, f"{len(payload)} payload bytes after a header with no tensor", sid)
        return message, None
    if math.prod(meta.shape) == 0:
        raise ProtocolError(ErrorCode.BAD_TENSOR, f"empty tensor of shape {meta.shape}", sid)
    mismatch = message.tensor_mismatch() if isinstance(message, _Rows) else None
    if mismatch:
        raise ProtocolError(ErrorCode.BAD_TENSOR, mismatch, sid)
    if len(payload) != meta.nbytes:
        raise ProtocolError(
            ErrorCode.BAD_TENSOR,
            f"payload is {len(payload)} bytes but {meta.dtype}{meta.shape} needs {meta.nbytes}",
            sid,
        )
    tensor = torch.frombuffer(bytearray(payload), dtype=WIRE_DTYPES[meta.dtype]).reshape(meta.shape)
    return message, tensor
