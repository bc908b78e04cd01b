"""One client's edge in split fine-tuning: embedding, head and tail blocks with LoRA,
final norm, LM head and the loss, driving the server's middle blocks over the wire.

A step: head blocks -> noise -> `train_forward` -> tail blocks, loss -> backward to the
tail input -> `train_backward` -> gradient at the server's input -> backward through the
head.  The noise is treated as a constant offset in the backward pass (straight-through),
so with noise 0 the step's gradients are exactly those of the unsplit model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fedsea_shared.noise import add_noise, public_prefix_len
from fedsea_shared.protocol import LoraSpec, OptimSpec
from fedsea_shared.shard import Partition, edge_layers, load_edge_shard
from fedsea_shared.training import (
    AdapterOptimizer,
    flatten,
    inject_lora,
    load_flat,
    lora_parameters,
    packed_attention,
    packed_positions,
)

from .connection import TrainingConnection
from .data import Example

EDGE = "edge"  # the edge's adapter name


@dataclass
class Packed:
    """A batch packed back to back, with the rows whose next token counts in the loss."""

    ids: torch.Tensor  # [tokens]
    positions: torch.Tensor  # [tokens]
    lengths: list[int]
    rows: torch.Tensor  # rows whose logits predict a target token
    labels: torch.Tensor  # that token, per row

    @classmethod
    def of(cls, batch: list[Example]) -> "Packed":
        ids, rows, labels, start = [], [], [], 0
        for ex in batch:
            ids += ex.ids
            for j in range(1, len(ex.ids)):
                if ex.target[j]:
                    rows.append(start + j - 1)
                    labels.append(ex.ids[j])
            start += len(ex.ids)
        lengths = [len(ex.ids) for ex in batch]
        return cls(torch.tensor(ids), packed_positions(lengths), lengths, torch.tensor(rows), torch.tensor(labels))

    def wire_savings(self, hidden_size: int, itemsize: int) -> dict[str, int]:
        """Bytes a padded batch would have sent that this packed one does not: the
        [B, 1, L, L] float mask and the padding rows of the hidden states."""
        b, longest = len(self.lengths), max(self.lengths)
        return {"mask_bytes": b * longest * longest * 4, "padding_bytes": (b * longest - sum(self.lengths)) * hidden_size * itemsize}


def protect_gradient(grad: torch.Tensor, lengths: list[int], clip: float, noise: float,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Clip each sample's share of the gradient sent to the server to L2 norm `clip`, then
    add N(0, (noise * clip)^2) per value.  The gradient at the tail input depends on the
    targets, so an unprotected one lets the server infer labels; this bounds how much any
    one sample can move what the server sees (the server's adapter then learns from the
    protected gradient).  clip=0: unchanged."""
    if clip <= 0:
        return grad
    parts = [g * (clip / g.norm().clamp_min(clip)) for g in grad.split(lengths)]
    out = torch.cat(parts)
    if noise > 0:
        out = out + torch.randn(out.shape, generator=generator, dtype=out.dtype) * (noise * clip)
    return out


class EdgeTrainer:
    def __init__(
        self, model_dir, partition: Partition, lora: LoraSpec, optim: OptimSpec, noise: float,
        seed: int = 0, dtype: torch.dtype = torch.float32, device: str = "cpu",
        send_grad_clip: float = 0.0, send_grad_noise: float = 0.0, weights: str | None = None,
        public_ids: list[int] | None = None,
    ):
        if send_grad_noise > 0 and send_grad_clip <= 0:
            raise ValueError("gradient noise is relative to the clip bound: set a gradient clip too")
        self.partition = partition
        self.noise = noise
        self.public_ids = public_ids or []  # the chat template's public prefix, sent clean as serving sends it
        self.send_grad_clip = send_grad_clip
        self.send_grad_noise = send_grad_noise
        self.seed = seed
        self.device = device
        self.dtype = dtype
        self.shard = load_edge_shard(model_dir, partition, dtype=dtype, device=device, weights=weights)
        inject_lora(self.shard, lora, edge_layers(partition), EDGE, seed)
        self.shard.to(device).train()
        self.params = lora_parameters(self.shard, EDGE)
        self.optimizer = AdapterOptimizer(self.params, optim, optim.total_steps)
        self._noise_gen = torch.Generator().manual_seed(seed)

    def _head(self, packed: Packed) -> torch.Tensor:
        hidden = self.shard.embed(packed.ids.to(self.device))
        return self.shard.run_blocks(self.partition.head_layers, hidden, packed.positions.to(self.device), packed_attention(packed.lengths))

    def _sent(self, hidden: torch.Tensor, packed: Packed, gen: torch.Generator) -> torch.Tensor:
        """The head output as the server gets it: noised, except each sequence's public
        template prefix (fedsea_shared.noise.public_prefix_len), as the serving edge sends it."""
        noised = add_noise(hidden, self.noise, gen)
        if not self.public_ids or self.noise == 0:
            return noised
        ids, start = packed.ids.tolist(), 0
        for n in packed.lengths:
            k = public_prefix_len(ids[start : start + n], self.public_ids)
            noised[start : start + k] = hidden[start : start + k]
            start += n
        return noised

    def _tail_logits(self, packed: Packed, mid: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        out = self.shard.run_blocks(self.partition.tail_layers, mid, packed.positions.to(self.device), packed_attention(packed.lengths))
        return self.shard.logits(out[rows.to(self.device)]).float()

    async def train_step(self, conn: TrainingConnection, batch: list[Example],
                         average_round: int | None = None) -> tuple[float, bool]:
        """One micro-batch through the split; returns (loss, whether the edge adapter stepped).
        `average_round`: before stepping, replace the edge's gradient by the clients' average
        in that aggregation round (FedSGD), so every client takes the same step."""
        packed = Packed.of(batch)
        head_out = self._head(packed)
        sid, mid = await conn.forward(packed.lengths, self._sent(head_out.detach(), packed, self._noise_gen))
        mid = mid.to(self.device, head_out.dtype).requires_grad_()
        loss = F.cross_entropy(self._tail_logits(packed, mid, packed.rows), packed.labels.to(self.device))
        (loss / self.optimizer.spec.grad_accum).backward()
        sent = protect_gradient(mid.grad, packed.lengths, self.send_grad_clip, self.send_grad_noise, self._noise_gen)
        grad_in, _ = await conn.backward(sid, sent)
        head_out.backward(grad_in.to(self.device, head_out.dtype))
        if not self.optimizer.accumulate():
            return loss.item(), False
        if average_round is not None:
            avg, _ = await conn.aggregate(average_round, len(batch), self.gradient_vector())
            load_flat(self.params, avg, grads=True)
        self.optimizer.step()
        return loss.item(), True

    @torch.no_grad()
    async def evaluate(self, conn: TrainingConnection, examples: list[Example], label_tokens: dict[str, int] | None,
                       batch_size: int) -> dict[str, float]:
        """Validation loss (per target token) and, for classification sets, the accuracy of
        the answer's first token among the labels'.  Noise as in training, from a fixed seed."""
        self.shard.eval()
        gen = torch.Generator().manual_seed(self.seed + 12345)
        total_loss, total_tokens, correct, counted = 0.0, 0, 0, 0
        try:
            for i in range(0, len(examples), batch_size):
                batch = examples[i : i + batch_size]
                packed = Packed.of(batch)
                _, mid = await conn.forward(packed.lengths, self._sent(self._head(packed), packed, gen), backward=False)
                starts = torch.tensor([0, *packed.lengths[:-1]]).cumsum(0)
                answer_rows = torch.tensor([s + ex.prompt_len - 1 for s, ex in zip(starts.tolist(), batch)])
                logits = self._tail_logits(packed, mid.to(self.device, self.dtype), torch.cat([packed.rows, answer_rows]))
                n = len(packed.rows)
                total_loss += F.cross_entropy(logits[:n], packed.labels.to(self.device), reduction="sum").item()
                total_tokens += n
                if label_tokens:
                    choices = torch.tensor(list(label_tokens.values()))
                    picked = logits[n:][:, choices].argmax(-1).tolist()
                    names = list(label_tokens)
                    # A sample cut so short that no prompt is left has no answer position.
                    scored = [(p, ex) for p, ex in zip(picked, batch) if ex.prompt_len > 0]
                    correct += sum(names[p] == ex.label for p, ex in scored)
                    counted += len(scored)
        finally:
            self.shard.train()
        result = {"loss": total_loss / max(1, total_tokens)}
        if counted:
            result["accuracy"] = correct / counted
        return result

    def rng_state(self) -> dict[str, torch.Tensor]:
        """The random state a resumed run must continue from: the noise/gradient-noise
        generator and torch's global one (LoRA dropout)."""
        return {"noise": self._noise_gen.get_state(), "torch": torch.get_rng_state()}

    def load_rng_state(self, state: dict[str, torch.Tensor]) -> None:
        self._noise_gen.set_state(state["noise"])
        torch.set_rng_state(state["torch"])

    def adapter_vector(self) -> torch.Tensor:
        return flatten(self.params)

    def gradient_vector(self) -> torch.Tensor:
        return flatten({n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in self.params.items()})

    def load_adapter_vector(self, flat: torch.Tensor) -> None:
        load_flat(self.params, flat)
