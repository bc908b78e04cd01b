"""Leakage metrics: how much of the victim's text an attack got back."""

from __future__ import annotations

import torch


def token_recovery(guess: torch.Tensor, truth: torch.Tensor) -> float:
    """Fraction of positions whose token was guessed exactly."""
    return (guess == truth).float().mean().item()


def lcs_length(a: list, b: list) -> int:
    """Longest common subsequence length, O(len(a) * len(b)) with one row of memory."""
    if len(a) < len(b):
        a, b = b, a
    row = [0] * (len(b) + 1)
    for x in a:
        diag = 0
        for j, y in enumerate(b, start=1):
            diag, row[j] = row[j], diag + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(guess: str, truth: str) -> float:
    """ROUGE-L F1 over lower-cased whitespace words."""
    g, t = guess.lower().split(), truth.lower().split()
    if not g or not t:
        return float(g == t)
    lcs = lcs_length(g, t)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(g), lcs / len(t)
    return 2 * precision * recall / (precision + recall)


def mean_rouge_l(tokenizer, guess: torch.Tensor, truth: torch.Tensor) -> float:
    """Mean ROUGE-L over windows, on the decoded text of guessed vs true tokens."""
    scores = [
        rouge_l(tokenizer.decode(g.tolist()), tokenizer.decode(t.tolist()))
        for g, t in zip(guess, truth)
    ]
    return sum(scores) / len(scores)


def canary_recovery(guess: torch.Tensor, truth: torch.Tensor, canaries) -> dict[str, float]:
    """Per kind of canary (name, number): fraction recovered exactly, every token right."""
    hits: dict[str, list[bool]] = {}
    for row, spans in enumerate(canaries):
        for kind, start, end in spans:
            hits.setdefault(kind, []).append(bool((guess[row, start:end] == truth[row, start:end]).all()))
    return {kind: sum(h) / len(h) for kind, h in hits.items()}
