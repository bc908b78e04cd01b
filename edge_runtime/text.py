"""Text on the way out: incremental detokenization and stop strings."""

from __future__ import annotations


class IncrementalDetokenizer:
    """Emits the text each new token adds, never a broken UTF-8 character.

    Decodes a short window of recent tokens (as vLLM does) rather than the whole
    sequence, and holds text back while it ends in U+FFFD, i.e. while a multi-byte
    character is still incomplete.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # window start
        self.read = 0  # tokens whose text has been emitted

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)
        done = decode(self.ids[self.prefix : self.read])
        full = decode(self.ids[self.prefix :])
        if len(full) <= len(done) or full.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return full[len(done) :]


class StopMatcher:
    """Finds stop strings across token boundaries; text that might begin a stop string is
    held back until it is known not to, and the stop string itself is never emitted."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        buf = self.pending + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.pending = ""
            return buf[: min(hits)], True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), hold, -1):
                if buf.endswith(s[:k]):
                    hold = k
                    break
        self.pending = buf[len(buf) - hold :] if hold else ""
        return buf[: len(buf) - hold], False

    def flush(self) -> str:
        text, self.pending = self.pending, ""
        return text
