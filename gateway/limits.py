"""What one request may cost the gateway: its share of the server connection's sessions,
and how much text it may have tokenized.

Sessions: every choice of a request holds one session on the edge's single connection
to the server runtime, which allows `Welcome.max_sessions` of them.  First come, first
served let two n=128 requests take all 256 and refuse everyone else.  So one request may
hold at most half of the sessions, and a request of several choices is only admitted
while a quarter stays free for single-choice requests: heavy requests are the ones refused.

Text: tokenizing costs ~1.7 s of CPU per MiB in the thread pool that every request's
prompt goes through, so a few 15 MiB messages would still hold everyone up.  No token
covers more characters than the longest vocabulary entry, so text longer than the
context times that (doubled, for normalizers that merge characters) cannot fit: it is
refused without being tokenized.
"""

from __future__ import annotations

from functools import lru_cache

from .errors import APIError


class SessionShare:
    def __init__(self) -> None:
        self.held = 0  # sessions held by admitted requests (one event loop: no lock)

    def acquire(self, choices: int, sessions: int) -> None:
        """Admit a request of `choices` choices on a connection of `sessions` sessions
        (release them when it ends), or refuse it with 429."""
        cap = max(1, sessions // 2)
        reserve = sessions // 4 if choices > 1 else 0
        if choices > cap:
            why = f"a request may make at most {cap} choices (prompts x n) on this deployment; ask for fewer"
        elif self.held + choices > sessions - reserve:
            why = (f"{self.held} of the server connection's {sessions} sessions are in use and this request needs "
                   f"{choices}{f' (requests of several choices leave {reserve} free)' if reserve else ''}; retry later")
        else:
            self.held += choices
            return
        raise APIError(429, f"too many generations in flight: {why}", "rate_limit_error", code="limit")

    def release(self, choices: int) -> None:
        self.held -= choices


@lru_cache(maxsize=8)
def _longest_token(tokenizer) -> int:
    return max(map(len, tokenizer.get_vocab()))


def refuse_overlong_text(texts: list[str], tokenizer, context: int, param: str) -> None:
    chars = sum(map(len, texts))
    bound = 2 * context * _longest_token(tokenizer)
    if chars > bound:
        raise APIError(400, f"this model's maximum context length is {context} tokens; {chars} characters cannot "
                       f"fit in it (at most {bound} can)", param=param, code="context_length_exceeded")
