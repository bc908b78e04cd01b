"""Qwen2 and Qwen2.5: Llama's block with biases on the q/k/v projections (none on o_proj),
which its config does not state.  Its sliding window is off unless `use_sliding_window`
(then on the layers from `max_window_layers` on; see the registry's `check_context`)."""

from transformers import Qwen2Config
from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

from .base import Architecture

QWEN2 = Architecture("qwen2", Qwen2Config, Qwen2RotaryEmbedding, qkv_bias=True, o_bias=False)
