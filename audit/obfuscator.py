"""Defense (b): a private obfuscating adapter on the edge's head blocks.

A LoRA on the head blocks and on the first `absorb` server blocks is trained through the
split, as split fine-tuning trains it: the head's part changes what the server receives,
the server's part (which the server holds) maps it back, so that the hidden state after
block head + absorb is what the unsplit model computes there and every later block runs
unchanged.  Matching that state rather than the output logits keeps the backward pass
to head + absorb blocks (a full-model KL costs ~6x more on CPU), so the tail needs no
adapter.  The objective is adversarial (VFLAIR-LLM's MID and ADMI train a client module
against inverters in the same spirit):

    loss = |h - h_unsplit|^2 / |h_unsplit|^2 at block head + absorb       utility
         + weight * mean P(inverter names the right token)                  leakage

where the inverters (one per-token MLP, one window transformer, audit.attacks) train on
the current adapted states after every step, so the head learns against attackers that
keep adapting.  The serving noise is applied at the cut during training and the public
template prefix is left clean, exactly as the edge sends it.

The result is two peft LoRA directories, so serving reuses `--adapter`
(fedsea_shared.adapters): `edge/` holds the head blocks and never leaves the
device; `server/` holds only the middle blocks.  What is secret is the edge adapter's
weights, i.e. the seed and data the device trained it with: the recipe (this file) is
public, so the audit's adaptive attacker trains its own copy.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig
from safetensors import safe_open
from safetensors.torch import save_file

from fedsea_shared.adapters import LoraAdapter, merged_shard
from fedsea_shared.noise import add_noise
from fedsea_shared.protocol import LoraSpec
from fedsea_shared.shard import ModelShard
from fedsea_shared.training import inject_lora, lora_parameters

from .attacks import contrastive_logits, make_inverter
from .capture import batched_causal_attend, head_states
from .data import Windows

SPEC = LoraSpec(rank=8, alpha=16.0, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
_NAME = "obf"
ABSORB = 4  # server blocks whose LoRA restores the unsplit state


@dataclass(frozen=True)
class Obfuscator:
    edge_dir: Path  # head blocks: stays on the device
    server_dir: Path  # middle blocks: given to the server

    def edge_shard(self, shard: ModelShard) -> ModelShard:
        """`shard` (any blocks) with the edge adapter merged: its head computes what the
        edge sends."""
        return merged_shard(shard, LoraAdapter.read(self.edge_dir))

    def full_shard(self, shard: ModelShard) -> ModelShard:
        """A shard of every block with both halves merged: the whole served model."""
        return merged_shard(self.edge_shard(shard), LoraAdapter.read(self.server_dir))


def _layer(name: str) -> int:
    return int(name.split(".")[2])  # model.layers.<i>.…


def _split_forward(student: ModelShard, head: int, depth: int, ids: torch.Tensor, prefix: int, noise: float, gen):
    """(what the server receives [B, T, H], hidden state after block `depth`) of the
    adapted split model."""
    b, t = ids.shape
    attend = batched_causal_attend(b, t)
    pos = torch.arange(t).repeat(b)
    cut = student.run_blocks(range(head), student.embed(ids.reshape(-1)), pos, attend).view(b, t, -1)
    sent = torch.cat([cut[:, :prefix], add_noise(cut[:, prefix:], noise, gen)], dim=1)
    return sent, student.run_blocks(range(head, depth), sent.reshape(b * t, -1), pos, attend).view(b, t, -1)


def train_obfuscator(
    shard: ModelShard, model_name: str, head: int, windows: Windows, noise: float, steps: int, out: Path,
    absorb: int = ABSORB, seed: int = 0, weight: float = 1.0, batch: int = 4, lr: float = 1e-3,
    server_from: Path | None = None,
) -> Obfuscator:
    """Train on `windows` (the device's own text) and write `out/edge`, `out/server`.

    `shard` holds at least blocks 0 .. head + absorb - 1 (it is copied, not changed).
    `server_from`: start the server blocks' LoRA from this server directory and keep it
    fixed (an attacker who is the server holds the real one and trains only a shadow head
    against it).
    """
    depth = head + absorb
    if depth > shard.config.num_hidden_layers:
        raise ValueError(f"head {head} + absorb {absorb} exceeds the model's {shard.config.num_hidden_layers} blocks")
    student = copy.deepcopy(shard)
    inject_lora(student, SPEC, list(range(depth)), _NAME, seed)
    params = lora_parameters(student, _NAME)
    if server_from is not None:
        with safe_open(str(Path(server_from) / "adapter_model.safetensors"), framework="pt") as f:
            given = {k.removeprefix("base_model.model."): f.get_tensor(k) for k in f.keys()}
        with torch.no_grad():
            for name, p in params.items():
                if _layer(name) >= head:
                    p.copy_(given[name])
                    p.requires_grad_(False)
    trainable = [p for p in params.values() if p.requires_grad]

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    hidden = shard.config.hidden_size
    inverters = [make_inverter(kind, hidden, windows.ids.shape[1]) for kind in ("mlp", "seq")]
    inv_opt = torch.optim.AdamW([p for inv in inverters for p in inv.parameters()], lr=1e-3, weight_decay=0.01)
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    keys = F.normalize(shard.model.embed_tokens.weight.detach().float(), dim=-1)
    p = windows.prefix
    student.train()
    for _ in range(steps):
        ids = windows.ids[torch.randint(0, windows.ids.shape[0], (batch,), generator=gen)]
        with torch.no_grad():
            target = head_states(shard, ids, [depth])[depth][:, p:]  # the unsplit model's state
        sent, reached = _split_forward(student, head, depth, ids, p, noise, gen)
        # Per-token error relative to the token's own energy: the sink's outliers do not dominate.
        utility = ((reached[:, p:] - target).pow(2).sum(-1) / target.pow(2).sum(-1)).mean()
        content, y = sent[:, p:], ids[:, p:]
        leak = torch.stack([
            F.softmax(lg, -1).gather(1, lab[:, None]).mean()
            for lg, lab in (contrastive_logits(inv, content, y, keys) for inv in inverters)
        ]).mean()
        opt.zero_grad(set_to_none=True)
        (utility + weight * leak).backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        # The inverters catch up with the head as it is now.
        inv_opt.zero_grad(set_to_none=True)
        sum(F.cross_entropy(*contrastive_logits(inv, content.detach(), y, keys)) for inv in inverters).backward()
        inv_opt.step()

    result = Obfuscator(out / "edge", out / "server")
    tensors = {n: t.detach().float().contiguous() for n, t in params.items()}
    _save(result.edge_dir, model_name, {n: t for n, t in tensors.items() if _layer(n) < head})
    _save(result.server_dir, model_name, {n: t for n, t in tensors.items() if _layer(n) >= head})
    return result


def _save(out: Path, model_name: str, tensors: dict[str, torch.Tensor]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    save_file({f"base_model.model.{n}": t for n, t in tensors.items()}, str(out / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    LoraConfig(r=SPEC.rank, lora_alpha=SPEC.alpha, target_modules=list(SPEC.targets), base_model_name_or_path=model_name,
               task_type="CAUSAL_LM").save_pretrained(str(out))
