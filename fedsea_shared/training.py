"""What both sides of split fine-tuning compute the same way: packed-batch attention and
LoRA adapters on a shard.

A training batch is *packed*: the samples' tokens lie back to back in one [tokens, hidden]
tensor and only their lengths travel with it.  Each sample's positions are 0..len-1 and its
causal mask is rebuilt from its length, so the [B, 1, L, L] attention mask a padded batch
would need never crosses the wire (the paper's attention-mask compression).

LoRA comes from `peft`, injected straight into the shard's `nn.Linear` modules.  Because
shard parameter names equal the Hugging Face checkpoint's, adapter tensors get the same
names as a `peft` adapter of the full model (`model.layers.3.self_attn.q_proj.lora_A.weight`)
and a saved adapter loads with `PeftModel.from_pretrained` on the unsplit model.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from .protocol import LoraSpec, OptimSpec
from .shard import AttentionFn, causal_attention


def packed_positions(lengths: list[int], device: str | torch.device = "cpu") -> torch.Tensor:
    """Positions 0..len-1 of each sample, concatenated."""
    return torch.cat([torch.arange(n, device=device) for n in lengths])


def packed_attention(lengths: list[int]) -> AttentionFn:
    """Full causal attention within each sample of a packed batch (no KV cache: training
    sees every token of a sample at once)."""

    def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        scale = q.shape[-1] ** -0.5
        parts = zip(q.split(lengths), k.split(lengths), v.split(lengths))
        return torch.cat([causal_attention(qi, ki, vi, scale) for qi, ki, vi in parts])

    return attend


def inject_lora(shard: nn.Module, spec: LoraSpec, layers: list[int], adapter: str, seed: int) -> None:
    """Add a LoRA adapter named `adapter` to the target modules of the given blocks.

    `seed` makes the initialisation reproducible: A is Kaiming-uniform as in `peft`, B is
    zero, so a fresh adapter leaves the model's output unchanged.
    """
    config = LoraConfig(
        r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
        target_modules=list(spec.targets), layers_to_transform=layers, layers_pattern="layers",
    )
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # peft warns when a second adapter is added; several named adapters are the point here.
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        torch.manual_seed(seed)
        inject_adapter_in_model(config, shard, adapter_name=adapter)
    # peft leaves only the first (active) adapter trainable; every adapter here trains.
    for name, param in shard.named_parameters():
        if ".lora_" in name:
            param.requires_grad_(True)


def lora_parameters(shard: nn.Module, adapter: str) -> dict[str, nn.Parameter]:
    """An adapter's parameters by their `peft` file name (the adapter name dropped), in a
    fixed order both sides agree on."""
    suffix = f".{adapter}.weight"
    found = {
        name[: -len(suffix)] + ".weight": p
        for name, p in shard.named_parameters()
        if ".lora_" in name and name.endswith(suffix)
    }
    if not found:
        raise ValueError(f"no LoRA adapter {adapter!r} on this shard (do its target modules exist?)")
    return dict(sorted(found.items()))


def flatten(params: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).float() for p in params.values()])


@torch.no_grad()
def load_flat(params: dict[str, torch.Tensor], flat: torch.Tensor, grads: bool = False) -> None:
    """Copy a flat vector into the parameters (`grads`: into their gradients)."""
    total = sum(p.numel() for p in params.values())
    if flat.numel() != total:
        raise ValueError(f"adapter vector has {flat.numel()} values, this adapter has {total}")
    for p, chunk in zip(params.values(), flat.split([p.numel() for p in params.values()])):
        if grads:
            p.grad = chunk.view_as(p).to(p.dtype).clone()
        else:
            p.copy_(chunk.view_as(p))


def lr_lambda(spec: OptimSpec, total_steps: int):
    """Linear warmup, then constant, linear or cosine decay to 0 at total_steps."""

    def factor(step: int) -> float:
        if step < spec.warmup_steps:
            return (step + 1) / spec.warmup_steps
        if spec.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - spec.warmup_steps) / max(1, total_steps - spec.warmup_steps))
        return 1.0 - progress if spec.schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))

    return factor


class AdapterOptimizer:
    """AdamW + schedule + clipping + accumulation for one adapter (edge or server)."""

    def __init__(self, params: dict[str, torch.nn.Parameter], spec: OptimSpec, total_steps: int):
        self.params = params
        self.spec = spec
        self.optimizer = torch.optim.AdamW(list(params.values()), lr=spec.lr, weight_decay=spec.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(spec, total_steps))
        self.micro = 0

    def micro_step(self) -> bool:
        """Count one accumulated micro-batch; step when grad_accum of them are in."""
        if not self.accumulate():
            return False
        self.step()
        return True

    def accumulate(self) -> bool:
        """Count one micro-batch; True when an optimizer step is due."""
        self.micro += 1
        return self.micro % self.spec.grad_accum == 0

    def step(self) -> None:
        if self.spec.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(list(self.params.values()), self.spec.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(), "micro": self.micro}

    # The wire form of the whole state (the server's half of a checkpoint): two counters
    # and one [3, values] float32 tensor of the flat adapter and AdamW's two moments.  The
    # learning rate is a function of the step count, so the counters restore the schedule.

    @property
    def steps(self) -> int:
        """Optimizer steps taken (the schedule's position)."""
        return self.scheduler.last_epoch

    @torch.no_grad()
    def export_state(self) -> torch.Tensor:
        moments = [[self.optimizer.state.get(p, {}).get(k) for p in self.params.values()] for k in ("exp_avg", "exp_avg_sq")]
        rows = [flatten(self.params)] + [
            torch.cat([(m if m is not None else torch.zeros_like(p)).reshape(-1).float() for m, p in zip(ms, self.params.values())])
            for ms in moments
        ]
        return torch.stack(rows)

    @torch.no_grad()
    def restore_state(self, steps: int, micro: int, state: torch.Tensor) -> None:
        """Inverse of (steps, micro, export_state()); the caller has checked the shape."""
        load_flat(self.params, state[0])
        sizes = [p.numel() for p in self.params.values()]
        for p, avg, sq in zip(self.params.values(), state[1].split(sizes), state[2].split(sizes)):
            self.optimizer.state[p] = {"step": torch.tensor(float(steps)), "exp_avg": avg.view_as(p).to(p).clone(),
                                       "exp_avg_sq": sq.view_as(p).to(p).clone()}
        # What LambdaLR computes after `steps` scheduler steps.
        lrs = [base * fn(steps) for fn, base in zip(self.scheduler.lr_lambdas, self.scheduler.base_lrs)]
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        self.scheduler.load_state_dict({**self.scheduler.state_dict(), "last_epoch": steps, "_step_count": steps + 1, "_last_lr": lrs})
        self.micro = micro

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.micro = state["micro"]
