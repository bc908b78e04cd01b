"""What the server saw of a chat request, shown by the chat page (POST /fedsea/v1/inspect).

Everything here runs on the device, from what the gateway already holds: the prompt text
with the pseudonymizer's surrogates in place, the hidden states that prompt puts on the
wire (their count and size), and, on request, what an attacker holding the public weights
reads back from exactly those noised states.  Nothing new is sent to the server.

The states are recomputed rather than taken from a session: the noise is keyed to the
tokens (fedsea_shared.noise), so the head blocks and the edge's key give the very states a
session sends for this prompt.  The reconstruction is the audit's vocabulary matching
(audit.attacks.vocabulary_matching), the strongest attack it has that needs no training:
about 0.5 s for a 60-token message with SmolLM2-135M on one core, after a probe table
built once per model or adapter (49152 tokens through the head blocks: 8 to 30 s on this
2-core machine, 113 MB kept).  The attacker is given the true conversation before the
message, so the share it recovers is an upper bound on what noise alone protects.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from audit.attacks import probe_table, vocabulary_matching
from audit.capture import head_states
from edge_runtime.client import AsyncEdgeClient
from fedsea_shared.noise import add_keyed_noise, keep_public, public_prefix_len
from fedsea_shared.protocol import WIRE_DTYPES

from . import errors
from .schemas import ChatCompletionRequest

MAX_RECONSTRUCTED_TOKENS = 512  # a longer message is reconstructed up to here (~5 s)
CANDIDATES = 8  # per position: the true token was among the probe's 8 nearest in 99% of positions even at noise 2 (SmolLM2, head 2, a 68-token chat)


class InspectRequest(ChatCompletionRequest):
    """A /v1/chat/completions body (its sampling fields are ignored), and whether to run
    the reconstruction."""

    reconstruct: bool = False


@dataclass
class Span:
    kind: str  # "first", "last", "number", "email"
    text: str  # as the user typed it (shown on the device only)
    surrogate: str
    start: int  # of the surrogate in the sent text
    end: int


def sent_text(client: AsyncEdgeClient, messages: list[dict], tools: list[dict] | None) -> tuple[str, list[Span], tuple[int, int]]:
    """The text the edge tokenizes for this chat (what `chat_prompt` encodes), the
    surrogates in it, and the character range of the last message's content there."""
    text, pseudonyms = client.chat_text(messages, tools)
    # A fresh mapping fed the same messages in the same order makes the same choices.
    replay = client.pseudonymizer.conversation() if pseudonyms is not None else None
    spans: list[Span] = []
    cursor, last = 0, (len(text), len(text))
    for m in messages:
        content = m.get("content") or ""
        found, shift = [], 0  # (replacement, start of its surrogate in the substituted content)
        if replay is not None:
            for r in replay.replacements(content):
                found.append((r, r.start + shift))
                shift += len(r.surrogate) - len(r.original)
            content = replay.substitute(content)  # the same replacements again: the mapping holds them
        # Templates may strip a message's outer whitespace: look for what they keep.
        kept, lead = content.strip(), len(content) - len(content.lstrip())
        at = text.find(kept, cursor) if kept else -1
        if at < 0:  # not in the text as written: nothing of it to place or reconstruct
            last = (len(text), len(text))
            continue
        spans += [Span(r.kind, r.original, r.surrogate, at - lead + start, at - lead + start + len(r.surrogate))
                  for r, start in found if lead <= start and start + len(r.surrogate) <= lead + len(kept)]
        cursor, last = at + len(kept), (at, at + len(kept))
    return text, spans, last


class Inspector:
    """The reconstruction's probe tables (one per model or adapter, the latest kept) and a
    lock that runs one reconstruction at a time: each takes the cores for a while."""

    def __init__(self, client: AsyncEdgeClient):
        self.client = client
        self._lock = threading.Lock()
        self._table: tuple[str | None, torch.Tensor] | None = None

    def _probe(self, adapter: str | None) -> tuple[torch.Tensor, float]:
        if self._table is None or self._table[0] != adapter:
            self._table = None  # the old one's memory goes before the new one's is taken
            start = time.perf_counter()
            shard, head = self.client.workers[adapter].model.shard, self.client.partition.head
            prefix = self.client.public_ids or [self.client.tokenizer.bos_token_id or 0]
            table = F.normalize(probe_table(shard, prefix, [head])[head].float(), dim=-1)
            self._table = (adapter, table)
            return table, time.perf_counter() - start
        return self._table[1], 0.0

    def inspect(self, messages: list[dict], tools: list[dict] | None, adapter: str | None, reconstruct: bool) -> dict[str, Any]:
        """The report the chat page shows (see `POST /fedsea/v1/inspect` in gateway.app)."""
        client = self.client
        tokenizer = client.tokenizer
        try:
            text, spans, (lo, hi) = sent_text(client, messages, tools)
        except Exception as e:  # as in /v1/chat/completions: the template or the pseudonymizer refused
            raise errors.template_rejected(e) from e
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=tokenizer.is_fast)
        ids = encoded.input_ids
        limit = client.config.max_position_embeddings
        if len(ids) > limit:
            raise errors.context_too_long(f"this model's maximum context length is {limit} tokens; the prompt has {len(ids)}")
        hidden, itemsize = client.config.hidden_size, WIRE_DTYPES[client.settings.wire_dtype].itemsize
        # Tokens overlapping the last message's content (all after the public prefix without offsets).
        public = public_prefix_len(ids, client.public_ids)
        if tokenizer.is_fast:
            inside = [i for i, (a, b) in enumerate(encoded.offset_mapping) if a < hi and b > lo]
            first, end = (inside[0], inside[-1] + 1) if inside else (len(ids), len(ids))
        else:
            first, end = public, len(ids)
        report: dict[str, Any] = {
            "sent_text": text,
            "spans": [vars(s) for s in spans],
            "message": {"start": lo, "end": hi, "first_state": first, "states": end - first},
            "states": len(ids),
            "public_states": public,
            "hidden_size": hidden,
            "wire_dtype": client.settings.wire_dtype,
            "bytes": len(ids) * hidden * itemsize,
            "noise": client.settings.noise,
            "pseudonymize": client.pseudonymizer is not None,
            "reconstruction": None,
        }
        if reconstruct and end > first:
            report["reconstruction"] = self._reconstruct(ids, first, end, public, adapter)
        return report

    def _reconstruct(self, ids: list[int], first: int, end: int, public: int, adapter: str | None) -> dict[str, Any]:
        client = self.client
        end, cut = min(end, first + MAX_RECONSTRUCTED_TOKENS), end
        with self._lock, torch.inference_mode():
            table, table_s = self._probe(adapter)
            start = time.perf_counter()
            shard, head = client.workers[adapter].model.shard, client.partition.head
            clean = head_states(shard, torch.tensor([ids[:end]]), [head])[head][0]
            # As InferenceSession.step noises them, keyed by the same chain.
            digests = client.new_session(client.settings.noise, adapter).chain.extend(ids[:end])
            seen = keep_public(add_keyed_noise(clean, client.settings.noise, digests), clean, 0, public)
            seen = seen.to(WIRE_DTYPES[client.settings.wire_dtype])
            guess = vocabulary_matching(shard, head, ids[:first], seen[first:end], table, CANDIDATES).tolist()
            seconds = time.perf_counter() - start
        truth = ids[first:end]
        decode = client.tokenizer.decode
        tokens = [{"sent": decode([t]), "read": decode([g]), "ok": t == g} for t, g in zip(truth, guess)]
        return {
            "method": "vocabulary matching",
            "text": decode(guess),
            "tokens": tokens,
            "recovered": sum(t["ok"] for t in tokens) / len(tokens),
            "positions": len(tokens),
            "truncated": end < cut,
            "seconds": round(seconds, 3),
            "probe_table_seconds": round(table_s, 3),
        }
