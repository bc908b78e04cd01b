"""Reversible pseudonymization on the edge (privacy defense (c), after Hide and Seek,
Chen et al. 2023): before the prompt becomes token ids, personal names, digit runs and
e-mail addresses are replaced by surrogates of the same kind, so the server only ever
computes on surrogate tokens; the text the edge streams back has them mapped back.

Detection is cheap and local: e-mails and digit runs (3+ digits) by pattern; names from
the US census first-name list (PyPI package `names`, see scripts/setup.sh) when
capitalised (opening a sentence only when a capitalised word follows), the capitalised
words that follow a first name (surnames, with particles such as "van der"), and the
capitalised word after an introduction ("my name is", "I'm", "call me", "Mr.", ...).  What it misses reaches the server as typed.

A surrogate is a keyed function of this device's noise key and the original span (a
common census name; random digits and letters of the same shape), so one span gets the
same surrogate in every turn, retry and choice: a conversation's prefix reaches the server
in one version only.  The mapping lives in one `Pseudonyms` per request, rebuilt from the
conversation's text, never stored.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

MIN_DIGITS = 3  # shorter numbers (counts, days of the month) carry meaning and little identity
SURROGATES = 1000  # surrogates come from the most common names of each list...
WIDER_AFTER = 16  # ...or from the whole list once that many draws collided (numbers: one more digit)
MAX_ATTEMPTS = 64
PARTICLES = {"van", "der", "den", "de", "la", "le", "von", "del", "da", "di", "du", "dos", "bin", "al", "ter"}
# Words in the first-name list that are far more often something else when capitalised.
NOT_NAMES = {
    "january", "february", "march", "april", "may", "june", "july", "august", "september", "october",
    "november", "december", "monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday",
    "god", "christian", "will", "an", "in", "so", "to", "my", "a", "i", "ok", "love", "art", "star", "ha", "man",
    "ai", "hope", "joy", "sun", "long", "young", "see", "guy", "king", "queen", "major", "rich",
}
# Places the list also holds as first names: not detected (sending them is worth more than
# hiding them), though they stay in the surrogate pool.
PLACES = {
    "france", "paris", "america", "asia", "africa", "china", "india", "florida", "georgia", "virginia", "carolina",
    "dakota", "california", "nevada", "europe", "london", "berlin", "vienna", "houston", "dallas", "phoenix",
}
NOT_DETECTED = NOT_NAMES | PLACES
# Capitalised words that open a message or sentence in chat and so never continue a name.
NOT_SURNAMES = NOT_NAMES | {
    "the", "and", "but", "or", "oh", "yeah", "yes", "no", "well", "it", "that", "this", "what", "how", "when", "why",
    "where", "who", "haha", "lol", "ok", "okay", "we", "you", "he", "she", "they", "is", "are", "was", "im", "hi", "hey",
}
EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+")
DIGITS = re.compile(rf"(?<!\d)\d{{{MIN_DIGITS},}}")
WORD = re.compile(r"[A-Za-z]+")
ALNUM = re.compile(r"[A-Za-z0-9]+")
INTRO = re.compile(r"(?:\bmy name is|\bmy name's|\bi am|\bi'm|\bcall me|\bnamed|\bmrs?\.?|\bms\.?|\bdr\.?)\s+$", re.I)
TITLE = re.compile(r"\b(?:mrs?|ms|dr)\.?\s+$", re.I)


@lru_cache(maxsize=1)
def gazetteer() -> tuple[frozenset[str], tuple[str, ...], tuple[str, ...]]:
    """(every first name lower-cased, first names, surnames), title-cased and most common
    first, from the census lists the `names` package ships."""
    spec = importlib.util.find_spec("names")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("pseudonymization needs the PyPI package `names` (scripts/setup.sh), or pseudonymize=False")
    root = Path(list(spec.submodule_search_locations)[0])

    def read(name):  # rows: NAME freq cumulative rank, most common first
        return [(line.split()[0].title(), float(line.split()[1])) for line in (root / name).read_text().splitlines() if line.strip()]

    firsts = sorted(read("dist.male.first") + read("dist.female.first"), key=lambda r: -r[1])
    first_pool = tuple(dict.fromkeys(n for n, _ in firsts if n.lower() not in NOT_NAMES))
    last_pool = tuple(n for n, _ in read("dist.all.last") if n.isalpha())
    return frozenset(n.lower() for n, _ in firsts), first_pool, last_pool


@dataclass(frozen=True)
class Replacement:
    start: int  # character span of the original in the text
    end: int
    kind: str  # "first", "last", "number", "email"
    original: str
    surrogate: str


def _surname(word: str) -> bool:
    return len(word) > 1 and word[0].isupper() and word.lower() not in NOT_SURNAMES


def _same_case(surrogate: str, like: str) -> str:
    if like.isupper() and len(like) > 1:
        return surrogate.upper()
    return surrogate.lower() if like.islower() else surrogate


def _same_shape(original: str, digest: bytes) -> str:
    """Digits -> digits and letters -> letters (same case), keyed; the rest kept."""
    out = []
    for i, c in enumerate(original):
        b = digest[i % len(digest)] ^ (i // len(digest))
        if c.isdigit():
            out.append(str(b % 10))
        elif c.isalpha():
            out.append(chr((ord("A") if c.isupper() else ord("a")) + b % 26))
        else:
            out.append(c)
    return "".join(out)


class Pseudonyms:
    """One request's mapping original <-> surrogate, extended as its text is substituted
    in order (a mapping made for message k never changes what messages before k became)."""

    def __init__(self, key: bytes):
        self.key = key
        self.names, self.firsts, self.lasts = gazetteer()
        self.forward: dict[tuple[str, str], str] = {}  # (kind, canonical original) -> canonical surrogate
        self.reverse: dict[str, str] = {}  # surrogate as it may appear in text -> original
        self.typed: dict[tuple[str, str], str] = {}  # (kind, canonical original) -> as first typed
        self.used: set[str] = set()  # originals and surrogates, lower-cased: a new surrogate is neither
        self.known: dict[str, list[str]] = {}  # first alphanumeric run -> forms of held originals

    def surrogate(self, kind: str, original: str, attempt: int = 0) -> str:
        """The keyed surrogate of `original` (canonical form), before collision handling."""
        digest = hashlib.blake2b(f"{kind}\x00{original}\x00{attempt}".encode(), key=self.key, digest_size=32,
                                 person=b"fedsea-pseudonym").digest()
        if kind in ("first", "last"):
            pool = self.firsts if kind == "first" else self.lasts
            pool = pool if attempt >= WIDER_AFTER else pool[:SURROGATES]
            return pool[int.from_bytes(digest[:8], "big") % len(pool)]
        if kind == "email":
            local, domain = original.split("@", 1)
            head, _, tld = domain.rpartition(".")
            return f"{_same_shape(local, digest)}@{_same_shape(head, digest[16:])}.{tld}"
        return _same_shape("0" * (attempt // WIDER_AFTER) + original, digest)

    def _assign(self, kind: str, original: str) -> str:
        canonical = original.lower() if kind in ("first", "last", "email") else original
        if (kind, canonical) not in self.forward:
            self.used.add(canonical.lower())
            for attempt in range(MAX_ATTEMPTS):
                if (s := self.surrogate(kind, canonical, attempt)).lower() not in self.used:
                    break
            else:
                raise ValueError(f"too many distinct {kind} spans to pseudonymize in one request")
            self.used.add(s.lower())
            self.forward[(kind, canonical)] = s
            self.typed[(kind, canonical)] = original
            # As typed, capitalised or in capitals: a name seen once as "Mark" leaves "mark" alone.
            for form in {original, original.title(), original.upper()}:
                if head := ALNUM.match(form):  # (an e-mail may begin with "." or "+": not repeated then)
                    self.known.setdefault(head.group(), []).append(form)
        s = _same_case(self.forward[(kind, canonical)], original) if kind in ("first", "last") else self.forward[(kind, canonical)]
        for form in ({s, s.lower(), s.upper(), s.title()} if kind in ("first", "last") else {s}):
            self.reverse[form] = _same_case(original, form) if kind in ("first", "last") else original
        return s

    def detect(self, text: str) -> list[tuple[int, int, str]]:
        """(start, end, kind) of every sensitive span, in order, not overlapping."""
        spans = [(m.start(), m.end(), "email") for m in EMAIL.finditer(text)]
        in_email = bytearray(len(text) + 1)
        for s, e, _ in spans:
            in_email[s:e] = b"\1" * (e - s)
        spans += [(m.start(), m.end(), "number") for m in DIGITS.finditer(text) if not in_email[m.start()]]
        words = [m for m in WORD.finditer(text) if not in_email[m.start()]]
        i = 0
        while i < len(words):
            w = words[i]
            before = text[max(0, w.start() - 40) : w.start()]
            cued = INTRO.search(before[-20:]) is not None
            title = TITLE.search(before[-6:]) is not None
            word = w.group()
            known = word.lower() in self.names and word.lower() not in NOT_DETECTED
            follows = i + 1 < len(words) and text[w.end() : words[i + 1].start()].isspace() and _surname(words[i + 1].group())
            # A capitalised list word opening a sentence is a name only if a surname follows.
            opening = not before.rstrip() or before.rstrip()[-1] in ".!?:;\"\n"
            named = (word[0].isupper() and word.lower() not in NOT_SURNAMES or known) if cued else (
                known and word[0].isupper() and (follows or not opening))
            if not named:
                i += 1
                continue
            spans.append((w.start(), w.end(), "last" if title else "first"))
            # The capitalised words right after it (particles between them) are a surname.
            j = i + 1
            while j < len(words) and text[words[j - 1].end() : words[j].start()].isspace() and (
                _surname(words[j].group()) or words[j].group().lower() in PARTICLES
            ):
                j += 1
            while j > i + 1 and not _surname(words[j - 1].group()):  # no trailing particle
                j -= 1
            if j > i + 1:
                spans.append((words[i + 1].start(), words[j - 1].end(), "last"))
            i = j
        return sorted(spans)

    def replacements(self, text: str) -> list[Replacement]:
        """What `substitute` replaces: the detected spans and every other whole-word
        occurrence of an original this mapping already holds."""
        found = self.detect(text)
        for s, e, k in found:  # in order of appearance: surrogates never depend on later text
            self._assign(k, text[s:e])
        taken = bytearray(len(text) + 1)
        for s, e, _ in found:
            taken[s:e] = b"\1" * (e - s)
        originals = {form: key for key, typed in self.typed.items() for form in {typed, typed.title(), typed.upper()}}
        for m in ALNUM.finditer(text):
            for form in sorted(self.known.get(m.group(), ()), key=len, reverse=True):
                end = m.start() + len(form)
                if text.startswith(form, m.start()) and not text[end : end + 1].isalnum() and not any(taken[m.start() : end]):
                    found.append((m.start(), end, originals[form][0]))
                    taken[m.start() : end] = b"\1" * len(form)
                    break
        return [Replacement(s, e, k, text[s:e], self._assign(k, text[s:e])) for s, e, k in sorted(found)]

    def substitute(self, text: str) -> str:
        out, at = [], 0
        for r in self.replacements(text):
            out += [text[at : r.start], r.surrogate]
            at = r.end
        return "".join(out) + text[at:]

    def messages(self, messages: list[dict]) -> list[dict]:
        """The chat with every message's text substituted (string or text-part content)."""
        out = []
        for m in messages:
            content = m.get("content")
            if isinstance(content, str):
                m = {**m, "content": self.substitute(content)}
            elif isinstance(content, list):
                m = {**m, "content": [{**p, "text": self.substitute(p["text"])} if isinstance(p, dict) and isinstance(p.get("text"), str) else p
                                      for p in content]}
            out.append(m)
        return out

    def restore(self, text: str) -> str:
        restorer = Restorer(self.reverse)
        return restorer.push(text) + restorer.flush()


class Restorer:
    """Maps surrogates back in streamed text.  A surrogate counts only whole: a name or
    e-mail between non-alphanumerics, a number between non-digits (as DIGITS finds them), so
    text that might begin one, or ends with one that the next character could extend, is
    held back until it is known (like edge_runtime.text.StopMatcher)."""

    def __init__(self, reverse: dict[str, str]):
        self.reverse = reverse
        numbers = sorted((s for s in reverse if s.isdigit()), key=len, reverse=True)
        words = sorted((s for s in reverse if not s.isdigit()), key=len, reverse=True)
        either = lambda ss: "|".join(map(re.escape, ss))
        parts = ([rf"(?<![A-Za-z0-9])(?:{either(words)})(?![A-Za-z0-9])"] if words else []) + (
            [rf"(?<!\d)(?:{either(numbers)})(?!\d)"] if numbers else [])
        self.pattern = re.compile("|".join(parts)) if parts else None
        self.number_prefixes = {s[:k] for s in numbers for k in range(1, len(s) + 1)}
        self.word_prefixes = {s[:k] for s in words for k in range(1, len(s) + 1)}
        self.longest = max(map(len, reverse), default=0)
        self.pending = ""
        self.last = ""  # the last character emitted (a match must start at a word boundary)

    def _hold(self, buf: str) -> int:
        for i in range(max(0, len(buf) - self.longest), len(buf)):
            previous, rest = buf[i - 1] if i else self.last, buf[i:]
            if (rest in self.word_prefixes and not previous.isalnum()) or (rest in self.number_prefixes and not previous.isdigit()):
                return i
        return len(buf)

    def _emit(self, buf: str, upto: int) -> str:
        out, at = [], 0
        if self.pattern is not None:
            full = self.last + buf
            for m in self.pattern.finditer(full, len(self.last)):
                s, e = m.start() - len(self.last), m.end() - len(self.last)
                if s >= upto:
                    break
                upto = max(upto, e)
                out += [buf[at:s], self.reverse[m.group()]]
                at = e
        out.append(buf[at:upto])
        self.pending = buf[upto:]
        if upto:
            self.last = buf[upto - 1]
        return "".join(out)

    def push(self, text: str) -> str:
        buf = self.pending + text
        return self._emit(buf, self._hold(buf))

    def flush(self) -> str:
        return self._emit(self.pending, len(self.pending))


class Pseudonymizer:
    """This device's pseudonymizer: a fresh `Pseudonyms` per request, all keyed alike."""

    def __init__(self, key: bytes):
        self.key = key
        gazetteer()  # a missing data package fails at startup, not at the first request

    def conversation(self) -> Pseudonyms:
        return Pseudonyms(self.key)


class PseudonymizedPrompt(list):
    """Token ids of a substituted prompt, carrying the mapping that restores its output."""

    def __init__(self, ids, pseudonyms: Pseudonyms):
        super().__init__(ids)
        self.pseudonyms = pseudonyms


class RestoringText:
    """Restores surrogates before the stop strings are matched (they are the user's)."""

    def __init__(self, restorer: Restorer, stops):
        self.restorer, self.stops = restorer, stops

    def push(self, text: str) -> tuple[str, bool]:
        return self.stops.push(self.restorer.push(text))

    def flush(self) -> str:
        text, stopped = self.stops.push(self.restorer.flush())
        return text if stopped else text + self.stops.flush()


def output_text(prompt_ids, stops):
    """`stops` (a StopMatcher), restoring this prompt's surrogates first if it has any."""
    pseudonyms = getattr(prompt_ids, "pseudonyms", None)
    return RestoringText(Restorer(pseudonyms.reverse), stops) if pseudonyms is not None and pseudonyms.reverse else stops


def restored(prompt_ids, text: str) -> str:
    """Text decoded from `prompt_ids` with its surrogates mapped back (echo)."""
    pseudonyms = getattr(prompt_ids, "pseudonyms", None)
    return pseudonyms.restore(text) if pseudonyms is not None else text
