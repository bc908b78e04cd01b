"""Serving a fine-tuned LoRA adapter: a shard with the adapter merged into its weights.

An adapter is the `peft` directory `fedsea-finetune` writes (`adapter_model.safetensors`
+ `adapter_config.json`), a LoRA of the whole model.  Each side reads only the LoRA
tensors of the blocks it holds (the server never reads the edge's, nor the other way
round) and merges them, W' = W + scale * B @ A, into a copy of just the target weights:
every other tensor (embedding, norms, LM head, untouched linears) is shared with the base
shard, so an adapter costs the memory of its target weights, not of a second model.  Over
a quantized base (int8, int4) an adapted weight is merged into a dequantized copy, dense in
the shard's dtype: the delta is served exactly, at the dense size for those weights only.
Merged weights run at the base model's speed; a batch that mixes models runs one forward
per model (see `server_runtime.engine`).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from .layers.linear import DENSE, Linear
from .shard import ModelShard, use_onednn, uses_onednn

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# peft's file names: base_model.model.<module>.lora_A.weight (the adapter name is dropped).
_LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_NAME = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


def parse_adapter_arg(spec: str) -> tuple[str, Path]:
    """`DIR` or `NAME=DIR` (as given to --adapter) -> (model id, directory).  The id
    defaults to the directory's name."""
    name, sep, path = spec.partition("=")
    if not sep or not _NAME.match(name):
        name, path = Path(spec).resolve().name, spec
    if not _NAME.match(name):
        raise ValueError(f"adapter name {name!r} must match [A-Za-z0-9._-]{{1,128}}; pass NAME=DIR")
    return name, Path(path)


def parse_adapter_args(specs: list[str], base_id: str) -> dict[str, Path]:
    adapters: dict[str, Path] = {}
    for spec in specs:
        name, path = parse_adapter_arg(spec)
        if name in adapters or name == base_id:
            raise ValueError(f"two models would be called {name!r}; name the adapter with --adapter NAME=DIR")
        adapters[name] = path
    return adapters


@dataclass(frozen=True)
class LoraAdapter:
    """What the merge needs from a peft LoRA adapter directory (no peft model loading)."""

    path: Path
    rank: int
    scale: float
    base_model: str | None

    @classmethod
    def read(cls, path: str | Path) -> "LoraAdapter":
        path = Path(path)
        config_file, weights = path / CONFIG_FILE, path / WEIGHTS_FILE
        if not config_file.is_file() or not weights.is_file():
            raise FileNotFoundError(f"{path} is not a LoRA adapter directory: it needs {CONFIG_FILE} and {WEIGHTS_FILE}")
        try:
            cfg = json.loads(config_file.read_text())
        except ValueError as e:
            raise ValueError(f"{config_file} is not valid JSON: {e}") from e
        if cfg.get("peft_type", "LORA") != "LORA":
            raise ValueError(f"{path}: only LoRA adapters can be served, not peft_type={cfg.get('peft_type')!r}")
        # Variants whose merge is not W + scale * B @ A are refused rather than served wrong.
        unsupported = {
            "use_dora": bool(cfg.get("use_dora")),
            "fan_in_fan_out": bool(cfg.get("fan_in_fan_out")),
            "bias": cfg.get("bias", "none") not in ("none", None),
            "modules_to_save": bool(cfg.get("modules_to_save")),
            "rank_pattern": bool(cfg.get("rank_pattern")),
            "alpha_pattern": bool(cfg.get("alpha_pattern")),
        }
        bad = [k for k, v in unsupported.items() if v]
        if bad:
            raise ValueError(f"{path}: LoRA options {bad} are not supported for serving")
        rank, alpha = cfg.get("r"), cfg.get("lora_alpha")
        if not isinstance(rank, int) or rank < 1 or not isinstance(alpha, (int, float)):
            raise ValueError(f"{path}: {CONFIG_FILE} needs an integer r >= 1 and a number lora_alpha")
        scale = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
        return cls(path, rank, scale, cfg.get("base_model_name_or_path"))

    def check_base(self, model: str, num_layers: int) -> None:
        """Refuse an adapter trained on another model: by name where it records one, and
        by its block indices (shapes are checked at the merge)."""
        if self.base_model and Path(self.base_model).name != Path(model).name:
            raise ValueError(
                f"adapter {self.path} was trained on {self.base_model!r}, not on the served model {model!r}"
            )
        try:
            with safe_open(str(self.path / WEIGHTS_FILE), framework="pt") as f:
                keys = list(f.keys())
        except Exception as e:  # safetensors raises its own error type on a corrupt file
            raise ValueError(f"adapter {self.path}: cannot read {WEIGHTS_FILE}: {e}") from e
        for key in keys:
            m = _LORA_KEY.match(key)
            if m is None:
                raise ValueError(f"adapter {self.path}: tensor {key!r} is not a LoRA weight of a linear layer; cannot serve it")
            layer = _LAYER.match(m["module"])
            if layer is None or int(layer[1]) >= num_layers:
                raise ValueError(f"adapter {self.path}: {m['module']!r} is not a block of this {num_layers}-block model")

    def deltas(self, shard: ModelShard, layers: list[int]) -> dict[str, torch.Tensor]:
        """scale * B @ A for each adapted linear of the given blocks, by weight name,
        read from only those blocks' tensors."""
        wanted = tuple(f"base_model.model.model.layers.{i}." for i in layers)
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        with safe_open(str(self.path / WEIGHTS_FILE), framework="pt") as f:
            for key in f.keys():
                m = _LORA_KEY.match(key)
                if m is not None and key.startswith(wanted):
                    pairs.setdefault(m["module"], {})[m["ab"]] = f.get_tensor(key).float()
        modules = dict(shard.named_modules())
        out = {}
        for module, ab in sorted(pairs.items()):
            if set(ab) != {"A", "B"}:
                raise ValueError(f"adapter {self.path}: {module} has lora_{next(iter(ab))} without its pair")
            linear = modules.get(module)
            if not isinstance(linear, torch.nn.Linear):
                raise ValueError(f"adapter {self.path}: this model has no linear layer {module!r}")
            a, b = ab["A"], ab["B"]
            expected = ((self.rank, linear.in_features), (linear.out_features, self.rank))
            if (tuple(a.shape), tuple(b.shape)) != expected:
                raise ValueError(
                    f"adapter {self.path}: {module} has A {list(a.shape)} and B {list(b.shape)}, but rank {self.rank} "
                    f"on this model needs {list(expected[0])} and {list(expected[1])} (a different base model or rank)"
                )
            out[f"{module}.weight"] = self.scale * (b @ a)
        return out


def merged_shard(base: ModelShard, adapter: LoraAdapter) -> ModelShard:
    """A shard computing base + adapter for the blocks `base` holds.  Only the adapted
    weights are new tensors; all others are the base shard's own."""
    layers = sorted(int(i) for i in base.model.layers)
    edge_parts = hasattr(base, "lm_head")
    deltas = adapter.deltas(base, layers)
    state = {n: t for n, t in base.state_dict().items() if not n.startswith("rotary.")}
    modules = dict(base.named_modules())
    dtype = next(base.parameters()).dtype  # a norm's: the activations'
    for name, delta in deltas.items():
        linear: Linear = modules[name.removesuffix(".weight")]
        w = linear.method.dequantize(linear)
        state[name] = (w.float() + delta.to(w.device)).to(w.dtype if linear.method is DENSE else dtype)
        for extra in linear.method.extra:  # now a dense weight
            del state[name.removesuffix("weight") + extra]
    with torch.device("meta"):
        shard = ModelShard(base.config, layers, edge_parts)
    shard.load_state_dict(state, strict=False, assign=True)
    if edge_parts:
        shard.model.embed_tokens.dtype = base.model.embed_tokens.dtype
        if base.lm_head.weight is base.model.embed_tokens.weight:
            shard.lm_head.tie(shard.model.embed_tokens)
    shard.rotary = base.rotary
    shard.eval().requires_grad_(False)
    if uses_onednn(base):
        use_onednn(shard)  # packs the adapted weights; the others are the base's packed ones
    return shard


def load_adapters(base: ModelShard, model: str, adapters: dict[str, str | Path]) -> dict[str, ModelShard]:
    """Merged shards by model id, each checked against the served model first."""
    out = {}
    for name, path in adapters.items():
        adapter = LoraAdapter.read(path)
        adapter.check_base(model, base.config.num_hidden_layers)
        out[name] = merged_shard(base, adapter)
    return out
