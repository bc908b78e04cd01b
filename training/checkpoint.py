"""Checkpoints that survive a crash of a client or of the server, and the final adapter.

At every FedAvg round each client writes its state (edge adapter, optimizer, step) and
client 0 also writes the server adapter it exported.  Files are written to a temporary
name and renamed, and the previous round's files are kept, so a crash mid-write never
leaves a run without a complete checkpoint: a rerun resumes every client from the
latest step all clients have saved.

The final adapter is a plain `peft` LoRA adapter of the whole model (edge and server
parts together): `adapter_model.safetensors` + `adapter_config.json`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file

from fedsea_shared.protocol import LoraSpec
from fedsea_shared.shard import ModelShard, Partition
from fedsea_shared.training import inject_lora, load_flat, lora_parameters

KEEP = 2  # rounds kept per client


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


class Checkpoints:
    def __init__(self, root: Path):
        self.root = Path(root)

    def _client_files(self, client: int) -> dict[int, Path]:
        found = {}
        for path in self.root.glob(f"client{client}-step*.pt"):
            m = re.fullmatch(rf"client{client}-step(\d+)\.pt", path.name)
            if m:
                found[int(m.group(1))] = path
        return found

    def common_step(self, clients: int) -> int:
        """The latest step every client (and the server adapter) has a checkpoint of; 0 if none."""
        steps = set.intersection(*(set(self._client_files(c)) for c in range(clients)))
        steps &= {s for s in steps if (self.root / f"server-step{s}.safetensors").is_file()}
        return max(steps, default=0)

    def save(self, client: int, step: int, state: dict, server: torch.Tensor | None) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if server is not None:
            _atomic(self.root / f"server-step{step}.safetensors", lambda p: save_file({"adapter": server.contiguous()}, str(p)))
        _atomic(self.root / f"client{client}-step{step}.pt", lambda p: torch.save(state, p))
        files = self._client_files(client)
        for old in sorted(files)[:-KEEP]:
            files[old].unlink(missing_ok=True)
            if server is not None:
                (self.root / f"server-step{old}.safetensors").unlink(missing_ok=True)

    def load(self, client: int, step: int) -> tuple[dict, torch.Tensor]:
        state = torch.load(self.root / f"client{client}-step{step}.pt", weights_only=True)
        server = load_file(str(self.root / f"server-step{step}.safetensors"))["adapter"]
        return state, server


def server_adapter_names(shard_config, partition: Partition, lora: LoraSpec) -> dict[str, torch.Size]:
    """Names and shapes of the server adapter's parameters, in flat-vector order, without
    loading any weights (the client holds no middle blocks)."""
    with torch.device("meta"):
        shard = ModelShard(shard_config, list(partition.server_layers), with_edge_parts=False)
        inject_lora(shard, lora, list(partition.server_layers), "server", seed=0)
    return {n: p.shape for n, p in lora_parameters(shard, "server").items()}


def save_adapter(out: Path, base_model: str, lora: LoraSpec, partition: Partition, edge: dict[str, torch.Tensor],
                 server_names: dict[str, torch.Size], server_flat: torch.Tensor) -> None:
    out.mkdir(parents=True, exist_ok=True)
    server = {n: torch.empty(shape) for n, shape in server_names.items()}
    load_flat(server, server_flat)
    tensors = {f"base_model.model.{n}": t.detach().float().contiguous() for n, t in {**edge, **server}.items()}
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.targets),
                        base_model_name_or_path=base_model, task_type="CAUSAL_LM")
    config.save_pretrained(str(out))
    (out / "fedsea_split.json").write_text(json.dumps({"head": partition.head, "tail": partition.tail}) + "\n")
