"""What a model family declares: its transformers config and rotary embedding classes, and
where its decoder block differs from LLaMA's.  fedsea runs one block implementation
(`shard.DecoderBlock`); a family only names its variations, as vLLM's model files do."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers import PretrainedConfig


@dataclass(frozen=True)
class Architecture:
    model_type: str  # config.json's "model_type"
    config_class: type[PretrainedConfig]
    rotary_class: type[nn.Module]  # called with the config, as transformers' own models do
    # Biases of the q/k/v and of the output projection: True/False where the family fixes
    # them, None where the config says (Llama's `attention_bias`; False if it has none).
    qkv_bias: bool | None = None
    o_bias: bool | None = None

    def attention_biases(self, config: PretrainedConfig) -> tuple[bool, bool]:
        configured = bool(getattr(config, "attention_bias", False))
        return (configured if self.qkv_bias is None else self.qkv_bias,
                configured if self.o_bias is None else self.o_bias)

    def rotary_embedding(self, config: PretrainedConfig) -> nn.Module:
        return self.rotary_class(config)
