"""Reversible pseudonymization on the edge (privacy defense (c), after Hide and Seek,
Chen et al. 2023): before the prompt becomes token ids, personal names, digit runs and
e-mail addresses are replaced by surrogates of the same kind, so the server only ever
computes on surrogate tokens; the text the edge streams back has them mapped back.

Detection is local (edge_runtime.pii: Presidio's recognizers, spaCy's NER and rules of
our own): names, e-mails, phone and card numbers, IBANs, street addresses, postcodes,
dates of birth, ids and digit runs.  What it misses reaches the server as typed.

A surrogate is a keyed function of this device's noise key and the original span (a
common census name; random digits and letters of the same shape; an address keeps its
street type, a date of birth its format), so one span gets the
same surrogate in every turn, retry and choice: a conversation's prefix reaches the server
in one version only.  The mapping lives in one `Pseudonyms` per request, rebuilt from the
conversation's text, never stored.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from .pii import MAX_CHARS, Detector, TextTooLong, gazetteer

SURROGATES = 1000  # surrogates come from the most common names of each list...
WIDER_AFTER = 16  # ...or from the whole list once that many draws collided (numbers: one more digit)
MAX_ATTEMPTS = 64
NAME_KINDS = ("first", "last")
MONTH_NAMES = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
               "November", "December")
WORDS = re.compile(r"[^\W\d_]+")
STREET_KEPT = re.compile(r"(?i:street|st|road|rd|avenue|ave|av|lane|ln|drive|dr|boulevard|blvd|court|ct|place|pl|way|"
                         r"rue|avenida|calle|rua|via|piazza|strasse|straße|str|weg|platz|straat|laan|p|o|box|apt|"
                         r"apartment|unit|suite|flat|de|la|del|di|da|do|du|des|of|the)")
ALNUM = re.compile(r"[A-Za-z0-9]+")


@dataclass(frozen=True)
class Replacement:
    start: int  # character span of the original in the text
    end: int
    kind: str  # "first", "last", "email", "phone", "address", ... (edge_runtime.pii.PRIORITY)
    original: str
    surrogate: str


def _same_case(surrogate: str, like: str) -> str:
    if like.isupper() and len(like) > 1:
        return surrogate.upper()
    return surrogate.lower() if like.islower() else surrogate


def _digits_keyed(original: str, digest: bytes, attempt: int) -> str:
    """`original` with its digits keyed, the rest kept (one more leading digit after many collisions)."""
    shaped = _same_shape(original, digest)
    return "1" * (attempt // WIDER_AFTER) + "".join(c if o.isdigit() else o for c, o in zip(shaped, original))


def _rehash(digest: bytes, i: int) -> bytes:
    return hashlib.blake2b(digest + bytes([i]), digest_size=32).digest()


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
        self.detector = Detector.shared()
        self.chars = 0  # text detected so far in this request (bounded: MAX_CHARS)
        self.made: list[Replacement] = []  # every replacement, in the order the text was substituted

    def surrogate(self, kind: str, original: str, attempt: int = 0) -> str:
        """The keyed surrogate of `original` (canonical form), before collision handling."""
        digest = hashlib.blake2b(f"{kind}\x00{original}\x00{attempt}".encode(), key=self.key, digest_size=32,
                                 person=b"fedsea-pseudonym").digest()
        if kind in NAME_KINDS:
            return self._pooled(kind, digest, attempt)
        if kind == "email":
            local, domain = original.split("@", 1)
            head, _, tld = domain.rpartition(".")
            return f"{_same_shape(local, digest)}@{_same_shape(head, digest[16:])}.{tld}"
        if kind == "address":  # stays readable: digits keyed, the street's words become surnames, its type stays
            words = iter(range(64))
            return WORDS.sub(lambda m: m.group() if STREET_KEPT.fullmatch(m.group()) or len(m.group()) < 3 else _same_case(
                self._pooled("last", _rehash(digest, next(words)), attempt), m.group()), _digits_keyed(original, digest, attempt))
        if kind == "dob":
            return WORDS.sub(lambda m: m.group() if len(m.group()) < 3 else _same_case(
                MONTH_NAMES[digest[0] % 12][: len(m.group())] if len(m.group()) < 5 else MONTH_NAMES[digest[0] % 12], m.group()),
                _digits_keyed(original, digest, attempt))
        return _same_shape("0" * (attempt // WIDER_AFTER) + original, digest)

    def _pooled(self, kind: str, digest: bytes, attempt: int) -> str:
        pool = self.firsts if kind == "first" else self.lasts
        pool = pool if attempt >= WIDER_AFTER else pool[:SURROGATES]
        return pool[int.from_bytes(digest[:8], "big") % len(pool)]

    def _assign(self, kind: str, original: str) -> str:
        canonical = original.lower() if kind in (*NAME_KINDS, "email") else original
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
        s = _same_case(self.forward[(kind, canonical)], original) if kind in NAME_KINDS else self.forward[(kind, canonical)]
        for form in ({s, s.lower(), s.upper(), s.title()} if kind in NAME_KINDS else {s}):
            self.reverse[form] = _same_case(original, form) if kind in NAME_KINDS else original
        return s

    def detect(self, text: str) -> list[tuple[int, int, str]]:
        """(start, end, kind) of every sensitive span, in order, not overlapping
        (edge_runtime.pii: kinds first, last, email, phone, card, iban, address, ...)."""
        self.chars += len(text)
        if self.chars > MAX_CHARS:
            raise TextTooLong(f"this request holds more than {MAX_CHARS} characters of text, more than the "
                              "pseudonymizer takes in one request; send less, or turn pseudonymization off")
        return [(sp.start, sp.end, sp.kind) for sp in self.detector.detect(text)]

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
            self.made.append(r)
            out += [text[at : r.start], r.surrogate]
            at = r.end
        return "".join(out) + text[at:]

    def messages(self, messages: list[dict]) -> list[dict]:
        """The chat with every message's text substituted: string or text-part content, and
        the string values in the arguments of its tool calls (a template that takes tools
        renders them itself)."""
        out = []
        for m in messages:
            content = m.get("content")
            if isinstance(content, str):
                m = {**m, "content": self.substitute(content)}
            elif isinstance(content, list):
                m = {**m, "content": [{**p, "text": self.substitute(p["text"])} if isinstance(p, dict) and isinstance(p.get("text"), str) else p
                                      for p in content]}
            if isinstance(m.get("tool_calls"), list):
                m = {**m, "tool_calls": [self._call(c) for c in m["tool_calls"]]}
            out.append(m)
        return out

    def _call(self, call):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or "arguments" not in function:
            return call
        return {**call, "function": {**function, "arguments": self._values(function["arguments"])}}

    def _values(self, value):
        """Every string in a JSON value substituted (keys are the tool's, not the user's)."""
        if isinstance(value, str):
            return self.substitute(value)
        if isinstance(value, dict):
            return {k: self._values(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self._values(v) for v in value]
        return value

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


def chat_text(tokenizer, pseudonymizer: Pseudonymizer | None, messages: list[dict], tools: list[dict] | None = None):
    """(the chat as the edge encodes it: templated, surrogates in place; its Pseudonyms or
    None when pseudonymization is off)."""
    pseudonyms = pseudonymizer.conversation() if pseudonymizer else None
    if pseudonyms:
        messages = pseudonyms.messages(messages)
    return tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False), pseudonyms


def sent_spans(text: str, pseudonyms: Pseudonyms | None) -> list[tuple[Replacement, int, int]]:
    """Each replacement made for `text` (from `chat_text`) with where its surrogate lies in
    it.  The template keeps the messages' order, so each is searched after the last."""
    out, at = [], 0
    for r in pseudonyms.made if pseudonyms else []:
        start = text.find(r.surrogate, at)
        if start < 0:  # a template that reorders: the first occurrence
            start = text.find(r.surrogate)
        if start >= 0:
            out.append((r, start, start + len(r.surrogate)))
            at = start + len(r.surrogate)
    return out


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
