"""Defense (c) in the audit: the edge's real pseudonymizer (edge_runtime.pseudonyms) runs
on each window's text before its states are captured, and the attacker's guesses on the
surrogate windows are mapped back to the original token positions, so every leakage
number is measured against what the user actually wrote.

Each window is one conversation under the device's key.  Only the token ranges that hold
a replaced span are re-encoded; every other token keeps its id and its position maps one
to one, so a guess counts for an original token only if it is that token.  A replaced
range maps position by position (a surrogate shorter than its original leaves the rest
unguessed), so a name or number is recovered only if the attacker writes the original.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from edge_runtime.pseudonyms import Pseudonymizer

from .data import Windows


@dataclass
class Substituted:
    ids: torch.Tensor  # [N, prefix + T'] surrogate windows, padded after the content
    prefix: int
    # Per row: (original start, end, surrogate start, end) of each replaced token range, content positions.
    ranges: list[list[tuple[int, int, int, int]]]
    content_len: int  # of the original windows
    original: list[list[int]]  # the original content ids
    pad_id: int

    def to_original(self, guess: torch.Tensor) -> torch.Tensor:
        """Guesses on the surrogate content [N, T'] -> guesses at the original content
        positions [N, T] (the pad token, never content, where the surrogate has no counterpart)."""
        out = torch.full((guess.shape[0], self.content_len), self.pad_id, dtype=guess.dtype)
        for row, ranges in enumerate(self.ranges):
            o = s = 0
            for a, b, sa, sb in [*ranges, (self.content_len, self.content_len, None, None)]:
                out[row, o:a] = guess[row, s : s + a - o]
                if sa is not None:
                    k = min(b - a, sb - sa)
                    out[row, a : a + k] = guess[row, sa : sa + k]
                    o, s = b, sb
        return out

    def surrogates_read(self, guess: torch.Tensor) -> float:
        """Fraction of replaced ranges whose surrogate tokens the guess reads exactly: the
        server then knows a name or number stood there (and its surrogate), not which."""
        content = self.ids[:, self.prefix :]
        hits = [bool((guess[row, sa:sb] == content[row, sa:sb]).all()) for row, r in enumerate(self.ranges) for _, _, sa, sb in r]
        return sum(hits) / max(1, len(hits))

    def detected(self, canaries, tokenizer) -> dict[str, float]:
        """Per kind of canary, the fraction whose every token but whitespace (between the
        groups of a phone number) lies in a replaced range."""
        hits: dict[str, list[bool]] = {}
        for ranges, spans, content in zip(self.ranges, canaries, self.original):
            for kind, start, end in spans:
                kept = [t for t in range(start, end) if not any(a <= t < b for a, b, _, _ in ranges)]
                hits.setdefault(kind, []).append(not tokenizer.decode([content[t] for t in kept]).strip())
        return {k: sum(h) / len(h) for k, h in hits.items()}


def substitute(tokenizer, windows: Windows, pseudonymizer: Pseudonymizer, pad_id: int) -> Substituted:
    rows, all_ranges = [], []
    for content in windows.content.tolist():
        pieces = [tokenizer.decode([t], clean_up_tokenization_spaces=False) for t in content]
        offsets = [0]
        for piece in pieces:
            offsets.append(offsets[-1] + len(piece))
        text = "".join(pieces)
        # Token ranges covering each replacement, merged where they share a token.
        groups: list[list] = []
        for r in pseudonymizer.conversation().replacements(text):
            a = max(i for i, c in enumerate(offsets) if c <= r.start)
            b = min(i for i, c in enumerate(offsets) if c >= r.end)
            if groups and a < groups[-1][1]:
                groups[-1][1] = max(groups[-1][1], b)
                groups[-1][2].append(r)
            else:
                groups.append([a, b, [r]])
        row, ranges, at = [], [], 0
        for a, b, reps in groups:
            row += content[at:a]
            segment, cursor = [], offsets[a]
            for r in reps:
                segment += [text[cursor : r.start], r.surrogate]
                cursor = r.end
            segment.append(text[cursor : offsets[b]])
            surrogate = tokenizer.encode("".join(segment), add_special_tokens=False)
            ranges.append((a, b, len(row), len(row) + len(surrogate)))
            row += surrogate
            at = b
        rows.append(row + content[at:])
        all_ranges.append(ranges)
    width = max(map(len, rows))
    prefix = windows.ids[0, : windows.prefix].tolist()
    ids = torch.tensor([prefix + r + [pad_id] * (width - len(r)) for r in rows], dtype=torch.long)
    return Substituted(ids, windows.prefix, all_ranges, windows.content.shape[1], windows.content.tolist(), pad_id)


def truncated(sub: Substituted) -> torch.Tensor:
    """The surrogate windows cut to the shortest one's length (no padding), for perplexity."""
    shortest = min(sub.prefix + sum(sb - sa - (b - a) for a, b, sa, sb in r) + sub.content_len for r in sub.ranges)
    return sub.ids[:, :shortest]
