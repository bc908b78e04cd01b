"""Utility where users feel it, through the real serving path: few-shot classification
(BBC topic, tweet sentiment) and greedy agreement with the unsplit model, temperature 0.

Every prompt runs exactly as `fedsea serve` runs it: an in-process server runtime
(`server_runtime.app.ServerThread`) holds the middle blocks and an `EdgeClient` does the
rest, noise and public-template exemption included.  Only the noise seed is fixed per
prompt, so a configuration's numbers are reproducible.  Noise 0 without adapters is the
unsplit model (the split is exact), the reference of the deltas.
"""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, Field

from training import data as task_data

TASKS = {"bbc-topic": task_data.bbc_news, "bbc-lead": task_data.bbc_leads, "tweet-sentiment": task_data.tweet_sentiment}
DEFAULT_TASKS = ("bbc-topic", "tweet-sentiment")
ANSWER_TOKENS = 3  # room for one label word
CHAT_TOKENS = 16


@dataclass(frozen=True)
class Serving:
    """One serving configuration as the edge runs it."""

    noise: float
    public_template: bool = True
    adapter: str | None = None  # a name in the `adapters` given to `measure`
    pseudonymize: bool = False  # names, numbers, e-mails -> keyed surrogates, restored in the reply


@dataclass
class Prompts:
    classify: dict[str, list[tuple[list[dict], str]]]  # task -> (messages, label)
    chat: list[list[dict]]


class TaskUtility(BaseModel):
    accuracy: dict[str, float] = Field(description="few-shot accuracy per task")
    hits: dict[str, list[bool]] = Field(default_factory=dict, description="per task, whether each query was answered right", repr=False)
    greedy: list[list[int]] = Field(description="greedy reply tokens of each chat prompt", repr=False)

    @property
    def mean_accuracy(self) -> float:
        return sum(self.accuracy.values()) / len(self.accuracy)

    def agreement_per_prompt(self, reference: "TaskUtility") -> list[float]:
        """Per chat prompt, the fraction of the reference's greedy tokens produced before the first difference."""
        fractions = []
        for ours, theirs in zip(self.greedy, reference.greedy):
            same = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
            fractions.append(same / max(1, len(theirs)))
        return fractions

    def agreement(self, reference: "TaskUtility") -> float:
        fractions = self.agreement_per_prompt(reference)
        return sum(fractions) / max(1, len(fractions))


def prompts(per_task: int, chats: int, seed: int, tasks: tuple[str, ...] = DEFAULT_TASKS) -> Prompts:
    """Few-shot prompts (one shot per label, the same shots for every query; queries taken
    round-robin over labels so a skewed task does not reward always answering its
    majority label) and single-turn chat prompts from the end of chitchat (the audit's
    victims and utility text come from its start).  A task gets at most as many queries as
    its rarest label allows (BBC: 5 x 385)."""
    rng = random.Random(seed)
    classify = {}
    for task in tasks:
        records = TASKS[task]()
        rng.shuffle(records)
        by_label: dict[str, list] = {}
        for r in records:
            by_label.setdefault(r.label, []).append(r)
        labels = sorted(by_label)
        shots = [by_label[label].pop() for label in labels]
        rng.shuffle(shots)
        context = [m for s in shots for m in s.messages]
        queries, count = [], min(per_task, len(labels) * min(map(len, by_label.values())))
        while len(queries) < count:
            label = labels[len(queries) % len(labels)]
            queries.append((context + [by_label[label].pop().messages[0]], label))
        classify[task] = queries
    chat = [r.messages[:1] for r in task_data.chitchat()[-chats:]] if chats else []
    return Prompts(classify, chat)


def _run(client, serving: Serving, p: Prompts, concurrency: int = 4) -> TaskUtility:
    """All prompts of one configuration, `concurrency` at a time: the edge and the server
    batch concurrent generations, as they do for concurrent users."""

    def reply(job):
        messages, max_tokens, seed = job
        return client.generate(messages, max_tokens=max_tokens, temperature=0, seed=seed,
                               noise=serving.noise, adapter=serving.adapter)

    with ThreadPoolExecutor(concurrency) as pool:
        accuracy, hits = {}, {}
        for task, queries in p.classify.items():
            replies = pool.map(reply, [(m, ANSWER_TOKENS, i) for i, (m, _) in enumerate(queries)])
            hits[task] = [r.text.strip().lower().startswith(label) for r, (_, label) in zip(replies, queries)]
            accuracy[task] = sum(hits[task]) / len(hits[task])
        greedy = [r.token_ids for r in pool.map(reply, [(m, CHAT_TOKENS, 10_000 + i) for i, m in enumerate(p.chat)])]
    return TaskUtility(accuracy=accuracy, hits=hits, greedy=greedy)


def measure(
    model: str, head: int, tail: int, servings: list[Serving], p: Prompts,
    adapters: dict[str, tuple[Path, Path]] | None = None,
) -> list[TaskUtility]:
    """Task utility of each configuration at one split.  `adapters`: name -> (edge
    directory, server directory); the server is given only its own directory, so an
    edge-private adapter never reaches it."""
    from edge_runtime import EdgeClient
    from server_runtime.app import ServerSettings, ServerThread
    from server_runtime.engine import EngineSettings

    adapters = adapters or {}
    # float32 on both sides: each configuration is compared with the exact unsplit model, so
    # the weight format's own cost stays out (benchmarks/weight_quality.py measures it).
    server = ServerThread(ServerSettings(
        model=model, head=head, tail=tail, port=0, weights="float32", adapters={n: str(s) for n, (_, s) in adapters.items()},
        # A queued step may wait long on a loaded CPU; the audit would rather wait than fail.
        engine=EngineSettings(wait_timeout=3600.0),
    ))
    try:
        with ExitStack() as stack:
            clients = {}
            for public, pseudonymize in sorted({(s.public_template, s.pseudonymize) for s in servings}):
                clients[public, pseudonymize] = stack.enter_context(EdgeClient(
                    server.url, model=model, head=head, tail=tail, public_template=public, pseudonymize=pseudonymize,
                    weights="float32", adapters={n: str(e) for n, (e, _) in adapters.items()},
                ))
            return [_run(clients[s.public_template, s.pseudonymize], s, p) for s in servings]
    finally:
        server.stop()
