"""Mistral: Llama's block without biases, with a sliding attention window on every layer
where the config sets `sliding_window` (the registry's `check_context` refuses to serve
a context longer than it)."""

from transformers import MistralConfig
from transformers.models.mistral.modeling_mistral import MistralRotaryEmbedding

from .base import Architecture

MISTRAL = Architecture("mistral", MistralConfig, MistralRotaryEmbedding, qkv_bias=False, o_bias=False)
