"""Llama 1/2/3.x and the models shaped like it (SmolLM2, ...): the block every family varies.
Llama 3.x `rope_scaling` lives in transformers' rotary embedding; an untied LM head is the
checkpoint's own `lm_head.weight` (`tie_word_embeddings: false`)."""

from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from .base import Architecture

LLAMA = Architecture("llama", LlamaConfig, LlamaRotaryEmbedding)
