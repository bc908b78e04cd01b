"""The client's end of split fine-tuning: train_* requests over the edge's websocket
connection (same handshake, same framing, same error routing by request id)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from edge_runtime.connection import ServerConnection, check_reply
from fedsea_shared.protocol import (
    AdapterState,
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
    encode,
    tensor_meta,
)


@dataclass
class ServerCheckpoint:
    """The server's half of a checkpoint (see TrainCheckpointState)."""

    round: int
    adapters: list[AdapterState]
    state: torch.Tensor  # [adapters, 3, values] float32

    def to_dict(self) -> dict:
        return {"round": self.round, "adapters": [a.model_dump() for a in self.adapters], "state": self.state}

    @classmethod
    def from_dict(cls, d: dict) -> "ServerCheckpoint":
        return cls(d["round"], [AdapterState(**a) for a in d["adapters"]], d["state"])


class TrainingConnection(ServerConnection):
    async def join(self, join: TrainJoin, resume: ServerCheckpoint | None = None) -> TrainJoined:
        """Join a job; `resume`: the server's half of a checkpoint, for a job the server
        does not have (a restarted or another server)."""
        sid = self.new_sid()
        update = {"sid": sid, "tensor": None, "resume": None}
        if resume is not None:
            update.update(tensor=tensor_meta(resume.state), resume=resume.adapters)
        reply, _ = await self._request(sid, encode(join.model_copy(update=update), resume.state if resume else None), TrainJoined)
        return reply

    async def forward(self, lengths: list[int], hidden: torch.Tensor, backward: bool = True) -> tuple[int, torch.Tensor]:
        """Send a packed batch's head output; returns (step id, middle output)."""
        sid = self.new_sid()
        hidden = hidden.detach().to(self.wire_dtype)
        meta = tensor_meta(hidden)
        frame = encode(TrainForward(sid=sid, lengths=lengths, backward=backward, tensor=meta), hidden)
        reply, out = await self._request(sid, frame, TrainOutput)
        check_reply(meta, reply.tensor, out)
        return sid, out

    async def backward(self, sid: int, grad: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """Send the gradient at the tail input of step `sid`; returns (gradient at the
        server's input, whether the server adapter stepped)."""
        grad = grad.detach().to(self.wire_dtype)
        meta = tensor_meta(grad)
        reply, grad_in = await self._request(sid, encode(TrainBackward(sid=sid, tensor=meta), grad), TrainGrad)
        check_reply(meta, reply.tensor, grad_in)
        return grad_in, reply.stepped

    async def aggregate(self, round: int, samples: int, flat: torch.Tensor, checkpoint: bool = False) -> tuple[torch.Tensor, int]:
        """FedAvg round `round`; `checkpoint`: the server keeps its state as of this round."""
        sid = self.new_sid()
        flat = flat.float()
        msg = TrainAggregate(sid=sid, round=round, samples=samples, checkpoint=checkpoint, tensor=tensor_meta(flat))
        reply, avg = await self._request(sid, encode(msg, flat), TrainAggregated)
        check_reply(msg.tensor, reply.tensor, avg, " (the average of adapters like it)")
        return avg, reply.clients

    async def export(self) -> torch.Tensor:
        sid = self.new_sid()
        _, flat = await self._request(sid, encode(TrainExport(sid=sid)), TrainState)
        return flat

    async def checkpoint(self) -> ServerCheckpoint:
        """The server state kept at the last round aggregated with checkpoint=True."""
        sid = self.new_sid()
        reply, state = await self._request(sid, encode(TrainCheckpoint(sid=sid)), TrainCheckpointState)
        return ServerCheckpoint(reply.round, reply.adapters, state)

    async def leave(self) -> None:
        sid = self.new_sid()
        await self._request(sid, encode(TrainLeave(sid=sid)), TrainLeft)
