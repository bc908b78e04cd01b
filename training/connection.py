"""The client's end of split fine-tuning: train_* requests over the edge's websocket
connection (same handshake, same framing, same error routing by request id)."""

from __future__ import annotations

import torch

from edge_runtime.connection import ServerConnection, check_reply
from fedsea_shared.protocol import (
    TrainAggregate,
    TrainAggregated,
    TrainBackward,
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


class TrainingConnection(ServerConnection):
    async def join(self, join: TrainJoin, resume: torch.Tensor | None = None) -> TrainJoined:
        sid = self.new_sid()
        join = join.model_copy(update={"sid": sid, "tensor": tensor_meta(resume) if resume is not None else None})
        reply, _ = await self._request(sid, encode(join, resume), TrainJoined)
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

    async def aggregate(self, round: int, samples: int, flat: torch.Tensor) -> tuple[torch.Tensor, int]:
        sid = self.new_sid()
        flat = flat.float()
        msg = TrainAggregate(sid=sid, round=round, samples=samples, tensor=tensor_meta(flat))
        reply, avg = await self._request(sid, encode(msg, flat), TrainAggregated)
        check_reply(msg.tensor, reply.tensor, avg, " (the average of adapters like it)")
        return avg, reply.clients

    async def export(self) -> torch.Tensor:
        sid = self.new_sid()
        _, flat = await self._request(sid, encode(TrainExport(sid=sid)), TrainState)
        return flat

    async def leave(self) -> None:
        sid = self.new_sid()
        await self._request(sid, encode(TrainLeave(sid=sid)), TrainLeft)
