"""Checkpoints that survive a crash of a client or of the server, and the final adapter.

At every FedAvg round each client writes one checkpoint directory,
`checkpoint/client<c>/step<S>/`: `state.pt` (edge adapter, optimizer, step, round, RNG
states, client 0's report) and, for client 0, `server.pt`, the server's half (its
adapters, AdamW moments and schedule position as of the same round, fetched over the
wire), so a resumed run continues exactly where the interrupted one was.  A directory is
written under a temporary name with `manifest.json` (each file's size and SHA-256) last,
then renamed: a crash mid-write leaves no half checkpoint.  A checkpoint whose files no
longer match their manifest (truncated, garbled) is skipped with a warning, and a rerun
resumes from the latest step that every client has intact; the last KEEP are kept.

The final adapter is a plain `peft` LoRA adapter of the whole model (edge and server
parts together): `adapter_model.safetensors` + `adapter_config.json`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import save_file

from fedsea_shared.protocol import LoraSpec
from fedsea_shared.shard import ModelShard, Partition
from fedsea_shared.training import inject_lora, load_flat, lora_parameters

from .connection import ServerCheckpoint

log = logging.getLogger("fedsea.finetune")

KEEP = 2  # checkpoints kept per client: the latest may be corrupt, the one before is the fallback
MANIFEST = "manifest.json"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Checkpoints:
    def __init__(self, root: Path):
        self.root = Path(root)

    def _dirs(self, client: int) -> dict[int, Path]:
        found = {}
        for path in (self.root / f"client{client}").glob("step*"):
            m = re.fullmatch(r"step(\d+)", path.name)
            if m and path.is_dir():
                found[int(m.group(1))] = path
        return found

    @staticmethod
    def _problem(path: Path, server: bool) -> str | None:
        """Why the checkpoint in `path` cannot be trusted; None if it is intact."""
        try:
            files = json.loads((path / MANIFEST).read_text())["files"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            return f"no readable {MANIFEST} ({e.__class__.__name__})"
        if not isinstance(files, dict):
            return f"{MANIFEST} lists no files"
        if "state.pt" not in files or (server and "server.pt" not in files):
            return f"{MANIFEST} lacks {'server.pt' if 'state.pt' in files else 'state.pt'}"
        for name, expect in files.items():
            if not isinstance(expect, dict):
                return f"{MANIFEST} entry of {name} is not a record"
            file = path / name
            if not file.is_file() or file.stat().st_size != expect.get("bytes"):
                return f"{name} is missing or truncated"
            if _sha256(file) != expect.get("sha256"):
                return f"{name} does not match its SHA-256"
        return None

    def intact_steps(self, client: int) -> list[int]:
        """This client's steps with an intact checkpoint (client 0's include the server's
        half), newest first; each corrupt one is logged."""
        steps = []
        for step, path in sorted(self._dirs(client).items(), reverse=True):
            problem = self._problem(path, server=client == 0)
            if problem is None:
                steps.append(step)
            else:
                log.warning("checkpoint %s is corrupt (%s); skipping it", path, problem)
        return steps

    def common_step(self, clients: int) -> int:
        """The latest step every client has an intact checkpoint of; 0 if none."""
        per_client = [self.intact_steps(c) for c in range(clients)]
        common = set.intersection(*map(set, per_client))
        step = max(common, default=0)
        newest = max((s for c in range(clients) for s in self._dirs(c)), default=0)
        if newest > step:
            log.warning("the latest checkpoint (step %d) is not intact for every client; falling back to %s",
                        newest, f"step {step}" if step else "the start")
        return step

    def save(self, client: int, step: int, state: dict, server: ServerCheckpoint | None) -> None:
        folder = self.root / f"client{client}"
        folder.mkdir(parents=True, exist_ok=True)
        for leftover in folder.glob(".step*.tmp"):  # of a write that crashed (one writer per folder)
            shutil.rmtree(leftover, ignore_errors=True)
        tmp = folder / f".step{step}.tmp"
        tmp.mkdir()
        torch.save(state, tmp / "state.pt")
        if server is not None:
            torch.save(server.to_dict(), tmp / "server.pt")
        files = {f.name: {"bytes": f.stat().st_size, "sha256": _sha256(f)} for f in sorted(tmp.iterdir())}
        (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": files}, indent=1) + "\n")
        for f in tmp.iterdir():  # on disk before the rename makes the checkpoint visible
            with f.open("rb") as fh:
                os.fsync(fh.fileno())
        final = folder / f"step{step}"
        shutil.rmtree(final, ignore_errors=True)  # a rerun that fell back writes this step again
        os.replace(tmp, final)
        dirs = self._dirs(client)
        for old in sorted(dirs)[:-KEEP]:
            shutil.rmtree(dirs[old], ignore_errors=True)

    def load(self, client: int, step: int) -> tuple[dict, ServerCheckpoint | None]:
        path = self._dirs(client)[step]
        state = torch.load(path / "state.pt", weights_only=True)
        server = path / "server.pt"
        return state, ServerCheckpoint.from_dict(torch.load(server, weights_only=True)) if server.is_file() else None


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
