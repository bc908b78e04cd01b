"""A fair share of the server connection's sessions among the gateway's requests.

Every choice of a request holds one session on the edge's single connection to the
server runtime, which allows `Welcome.max_sessions` of them.  First come, first served
let two n=128 requests take all 256 and refuse everyone else.  So one request may hold
at most half of the sessions, and a request of several choices is only admitted while a
quarter stays free for single-choice requests: the heavy requests are the ones refused.
"""

from __future__ import annotations

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
