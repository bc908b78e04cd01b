"""Grammar-constrained decoding on the edge: structured outputs and tool calls.

llguidance compiles a JSON Schema or a Lark grammar into a matcher that says, before
each token, which tokens may come next; the decode loop masks every other token out of
the edge's logits before sampling.  Schemas, grammars and masks never leave the edge.

llguidance was picked over xgrammar and outlines-core on this machine (SmolLM2
tokenizer, 49152 tokens): both it and xgrammar cost well under 0.1 ms per token
mask, negligible next to a decode step, but llguidance refuses the JSON Schema
keywords it cannot enforce (uniqueItems, not, if/then) where xgrammar accepts the
schema and silently ignores them, and it has no dependencies.  outlines-core (a regex
per schema, indexed over the whole vocabulary) was not measured to the end.
"""

from __future__ import annotations

from functools import cached_property

import llguidance
import llguidance.hf
import numpy as np
import torch

# Compact JSON with one space after ',' and ':' (as json.dumps writes it): a small
# model given free whitespace can pad forever.
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(ValueError):
    """A schema or grammar that cannot be compiled (or uses what cannot be enforced)."""


class Grammars:
    """Compiles grammars for one tokenizer and starts a matcher per generation.

    The llguidance view of the vocabulary takes about a second to build, so it is built
    once, on first use."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: set[int]):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_ids = sorted(eos_ids)

    @cached_property
    def lltokenizer(self) -> llguidance.LLTokenizer:
        return llguidance.hf.from_tokenizer(self.tokenizer, n_vocab=self.vocab_size, eos_token=self.eos_ids)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes of one token (part of a UTF-8 character for some tokens)."""
        return self.lltokenizer.decode_bytes([token_id])

    @staticmethod
    def json_schema(schema: dict) -> str:
        try:
            return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_STYLE)
        except ValueError as e:
            raise GrammarError(f"invalid JSON schema: {e}") from e

    @staticmethod
    def lark(text: str) -> str:
        return llguidance.LLMatcher.grammar_from_lark(text)

    def check(self, grammar: str) -> None:
        """Raise GrammarError unless `grammar` compiles for this vocabulary."""
        error = llguidance.LLMatcher.validate_grammar(grammar, self.lltokenizer)
        if error:
            raise GrammarError(error)

    def constraint(self, grammar: str) -> "Constraint":
        return Constraint(self._matcher(grammar), self.vocab_size)

    def triggered(self, grammar: str, trigger: str) -> "TriggeredConstraint":
        return TriggeredConstraint(self, grammar, trigger)

    def _matcher(self, grammar: str) -> llguidance.LLMatcher:
        matcher = llguidance.LLMatcher(self.lltokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(matcher.get_error())
        return matcher


class Constraint:
    """One generation's grammar state: `allowed()` before sampling, `advance(token)` after."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int):
        self.matcher = matcher
        self.vocab_size = vocab_size
        self._bits = np.zeros((vocab_size + 31) // 32, dtype=np.int32)

    def allowed(self) -> torch.Tensor | None:
        """Boolean mask over the vocabulary of the tokens that may come next."""
        self.matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        bits = np.unpackbits(self._bits.view(np.uint8), bitorder="little")[: self.vocab_size]
        if self.matcher.is_error() or not bits.any():  # e.g. a parser limit was hit
            raise GrammarError(f"the grammar admits no next token: {self.matcher.get_error() or 'dead end'}")
        return torch.from_numpy(bits.astype(np.bool_))

    def advance(self, token_id: int) -> None:
        if not self.matcher.consume_token(token_id):
            raise GrammarError(f"the grammar refused token {token_id}: {self.matcher.get_error()}")

    @property
    def finished(self) -> bool:
        """The grammar is complete and admits nothing more: the generation ends here."""
        return self.matcher.is_stopped()


class TriggeredConstraint:
    """Free text unless the answer opens with `trigger`; from then on the grammar holds.

    Used for tool_choice "auto": the model decides whether to call a tool, and once it
    starts a call the call must be valid.  The tokens that spelled the trigger are
    replayed into the matcher; if they do not fit it (a token ran past the trigger into
    something the grammar refuses), the answer stays unconstrained."""

    def __init__(self, grammars: Grammars, grammar: str, trigger: str):
        self.grammars = grammars
        self.grammar = grammar
        self.trigger = trigger
        self.tokens: list[int] = []
        self.active: Constraint | None = None
        self.free = False  # the answer did not open with the trigger

    def allowed(self) -> torch.Tensor | None:
        return self.active.allowed() if self.active else None

    def advance(self, token_id: int) -> None:
        if self.active:
            return self.active.advance(token_id)
        if self.free:
            return
        self.tokens.append(token_id)
        text = self.grammars.tokenizer.decode(self.tokens).lstrip()
        if text.startswith(self.trigger):
            matcher = self.grammars._matcher(self.grammar)
            if matcher.try_consume_tokens(self.tokens) == len(self.tokens):
                self.active = Constraint(matcher, self.grammars.vocab_size)
            else:
                self.free = True
        elif not self.trigger.startswith(text):
            self.free = True

    @property
    def finished(self) -> bool:
        return self.active is not None and self.active.finished
