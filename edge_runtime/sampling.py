"""Turning logits into the next token: penalties, temperature, top-k, top-p, seed."""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch

# Penalised logits are kept within +-LOGIT_BOUND: an extreme but legal penalty
# (repetition_penalty 1e-300 divides by a float32 zero) must not give Inf or NaN logits,
# and the bound is far enough from float32's limit that differences of logits stay finite.
LOGIT_BOUND = 1e30


@dataclass
class SamplingParams:
    max_tokens: int | None = 256  # None: until the context is full
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no top-k cut
    seed: int | None = None  # fixes sampling and the edge's noise
    stop: list[str] = field(default_factory=list)
    presence_penalty: float = 0.0  # OpenAI semantics, over generated tokens
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # HF semantics, over prompt and generated tokens
    logprobs: int | None = None  # return this many top alternatives per token (0..20)
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    prompt_logprobs: int | None = None  # also score the prompt's tokens, with this many alternatives

    def validate(self) -> None:
        for name, bounds in BOUNDS.items():
            value = getattr(self, name)
            if value is not None and not within(value, bounds):
                raise ValueError(f"{name} must be {describe(bounds)}")
        if not all(within(b, LOGIT_BIAS) for b in self.logit_bias.values()):
            raise ValueError(f"logit_bias values must be {describe(LOGIT_BIAS)}")


# Each option's valid values, in pydantic's terms: SamplingParams.validate checks them and
# the gateway's request schemas declare them, so the two cannot drift apart.
BOUNDS: dict[str, dict[str, float]] = {
    "max_tokens": {"ge": 1},
    "temperature": {"ge": 0, "le": 2},
    "top_p": {"gt": 0, "le": 1},
    "top_k": {"ge": 0},
    "presence_penalty": {"ge": -2, "le": 2},
    "frequency_penalty": {"ge": -2, "le": 2},
    "repetition_penalty": {"gt": 0, "le": 2},
    "logprobs": {"ge": 0, "le": 20},
    "prompt_logprobs": {"ge": 0, "le": 20},
}
LOGIT_BIAS = {"ge": -100, "le": 100}
_TESTS = {"ge": operator.ge, "gt": operator.gt, "le": operator.le, "lt": operator.lt}


def within(value: float, bounds: dict[str, float]) -> bool:
    return all(_TESTS[k](value, bound) for k, bound in bounds.items())


def describe(bounds: dict[str, float]) -> str:
    """'in (0, 1]', '>= 1', ... for messages."""
    low = next(((k, v) for k, v in bounds.items() if k in ("ge", "gt")), None)
    high = next(((k, v) for k, v in bounds.items() if k in ("le", "lt")), None)
    if low and high:
        return f"in {'[' if low[0] == 'ge' else '('}{low[1]}, {high[1]}{']' if high[0] == 'le' else ')'}"
    k, v = low or high
    return f"{ {'ge': '>=', 'gt': '>', 'le': '<=', 'lt': '<'}[k]} {v}"


@dataclass
class Sample:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] | None  # (token id, logprob) of the `logprobs` most likely tokens, sampled or not


def apply_penalties(logits: torch.Tensor, params: SamplingParams, prompt: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
    if params.repetition_penalty != 1.0:
        seen = torch.cat([prompt, generated]).unique()
        vals = logits[seen]
        logits[seen] = torch.where(vals > 0, vals / params.repetition_penalty, vals * params.repetition_penalty)
    if (params.presence_penalty or params.frequency_penalty) and generated.numel():
        counts = torch.bincount(generated, minlength=logits.shape[0]).to(logits.dtype)
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(logits.dtype)
    return torch.nan_to_num(logits, nan=-LOGIT_BOUND, posinf=LOGIT_BOUND, neginf=-LOGIT_BOUND).clamp_(-LOGIT_BOUND, LOGIT_BOUND)


def top_logprobs(logprobs: torch.Tensor, k: int) -> list[tuple[int, float]]:
    """The k most likely tokens, exactly k (as OpenAI's chat API): the sampled token's own
    logprob is reported beside them, not added to them."""
    values, ids = torch.topk(logprobs, k) if k else (torch.empty(0), torch.empty(0))
    return [(int(i), float(v)) for i, v in zip(ids, values)]


def score_prompt(logits: torch.Tensor, prompt: torch.Tensor, k: int) -> list[tuple[float, list[tuple[int, float]]]]:
    """(logprob, top alternatives) of each prompt token after the first, from the
    unprocessed logits of the positions before it."""
    logprobs = torch.log_softmax(logits[:-1].float(), dim=-1)
    return [(float(lp[t]), top_logprobs(lp, k)) for lp, t in zip(logprobs, prompt[1:])]


# Candidates the nucleus (top_p) is looked for among first: sorting all 49152 logits in
# float64 took 2.6 ms a token here, the top 256 0.12 ms; only when they hold less than top_p
# of the mass is everything sorted.
NUCLEUS_CANDIDATES = 256


def sample(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None,
    prompt: torch.Tensor,
    generated: torch.Tensor,
    allowed: torch.Tensor | None = None,
) -> Sample:
    """`allowed`: a boolean mask of the tokens a grammar admits next (None: all).
    Logprobs are those of the distribution sampled from, after bias and mask.

    Runs on the edge's event loop once per token of every generation, so each step counts
    (docs/performance.md)."""
    logits = logits.float()
    penalised = params.repetition_penalty != 1.0 or params.presence_penalty or params.frequency_penalty
    logits = apply_penalties(logits.clone() if penalised else logits, params, prompt, generated)  # a new tensor
    if params.logit_bias:
        ids = torch.tensor(list(params.logit_bias), dtype=torch.long)
        logits[ids] += torch.tensor(list(params.logit_bias.values()), dtype=logits.dtype)
    if allowed is not None:
        logits.masked_fill_(~allowed[: logits.shape[0]], float("-inf"))
    if params.temperature == 0:
        token = int(logits.cpu().numpy().argmax())  # the first maximum, as torch.argmax (62 us here, numpy 3)
    else:
        # In float64 and relative to the best logit: any legal temperature (down to 5e-324)
        # and top_p stays nonzero, and the best token's scaled logit is exactly 0, never NaN.
        scaled = (logits - logits.max()).double() / params.temperature
        token = _draw(scaled, params, generator)
    # log_softmax, not logsumexp: on a thread kept out of OpenMP (fedsea_shared.threads) torch's
    # logsumexp still starts a worker of its own, and the serving thread's team then sleeps
    # between regions (a one-client step went from 31 to 44 ms).
    logprobs = torch.log_softmax(logits, dim=-1)
    top = None if params.logprobs is None else top_logprobs(logprobs, params.logprobs)
    return Sample(token, float(logprobs[token]), top)


def _draw(scaled: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    if params.top_k:
        kth = torch.topk(scaled, min(params.top_k, scaled.shape[0])).values[-1]
        scaled[scaled < kth] = float("-inf")
    probs = torch.softmax(scaled, dim=-1)
    if params.top_p < 1.0:
        # Keep a token while the mass before it is below top_p (so at least one).
        ranked, order = torch.topk(probs, min(NUCLEUS_CANDIDATES, probs.shape[0]))
        if float(ranked.sum()) < params.top_p:
            ranked, order = torch.sort(probs, descending=True)
        keep = order[(ranked.cumsum(0) - ranked) < params.top_p]
        nucleus = torch.zeros_like(probs)
        nucleus[keep] = probs[keep]
        probs = nucleus
    # Inverse CDF with one uniform draw (torch.multinomial took 0.95 ms over 49152 here).
    cdf = probs.cumsum(0)
    u = torch.rand((), dtype=torch.float64, generator=generator) * cdf[-1]
    token = min(int(torch.searchsorted(cdf, u, right=True)), probs.shape[0] - 1)
    while probs[token] == 0:  # u rounded up to the total: the last token that can be drawn
        token -= 1
    return token
