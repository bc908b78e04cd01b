"""The edge API an application embeds.

    with EdgeClient("ws://127.0.0.1:8765") as client:
        for event in client.stream([{"role": "user", "content": "Hi"}], max_tokens=64):
            print(event.text, end="")

`AsyncEdgeClient` is the asyncio core (the gateway uses it); `EdgeClient` runs it on a
background event loop for synchronous code.  `server_url` may list several server runtimes
of the same model and cut: sessions open on the first one up (edge_runtime.servers picks),
and a session whose server dies or misbehaves replays its states to another and goes on.
All concurrent generations share one connection per server, and one decode loop per
model (edge_runtime.decode_loop) steps them all at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import threading
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Iterator

import torch
from transformers import AutoTokenizer, GenerationConfig

from fedsea_shared.adapters import load_adapters
from fedsea_shared.architectures import context_limit
from fedsea_shared.models import is_gguf, resolve_model
from fedsea_shared.noise import KEY_BYTES, NoiseChain, public_prefix_ids, public_prefix_len
from fedsea_shared.prefix import prefix_root
from fedsea_shared.protocol import PROTOCOL_VERSION, WIRE_DTYPES, ErrorCode, Hello
from fedsea_shared.shard import (ModelShard, Partition, apply_linear_kernel, fuse_projections, load_config,
                                 load_edge_shard, make_block_ops, resolve_weights, use_block_ops)
from fedsea_shared.threads import serial

from websockets.exceptions import WebSocketException

from .connection import ServerConnection, ServerError, client_ssl
from .constraints import Constraint, Grammars
from .decode_loop import DecodeLoop, Generation, TokenEvent
from .keys import load_or_create_key
from .model import EdgeModel, EdgeWorker, SequenceCache
from .prefix_cache import Prefix, PrefixStore
from .pseudonyms import Pseudonymizer, PseudonymizedPrompt, Pseudonyms, chat_text, output_text
from .sampling import SamplingParams, score_prompt
from .servers import LOAD_TTL_S, NoOtherServer, Occupancy, ServerList
from .settings import EdgeSettings
from .session import InferenceSession
from .text import IncrementalDetokenizer, StopMatcher

log = logging.getLogger("fedsea.edge")


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    events: list[TokenEvent] = field(default_factory=list, repr=False)

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


class AsyncEdgeClient:
    def __init__(self, settings: EdgeSettings | str | list[str] | None = None, /, **options):
        """`AsyncEdgeClient(settings)`, or `AsyncEdgeClient(server_url, **options)` with
        the options of `EdgeSettings` (edge_runtime.settings: every option and default)."""
        if not isinstance(settings, EdgeSettings):
            settings = EdgeSettings(**options) if settings is None else EdgeSettings(settings, **options)
        elif options:
            settings = dataclasses.replace(settings, **options)
        self.settings = s = settings
        self.servers = ServerList(s.servers)
        for url in self.servers.urls:
            client_ssl(url, s.server_ca)  # a bad URL/CA pair fails here, not at every reconnect
        model_dir = resolve_model(s.model)
        self.config = load_config(model_dir)
        self.partition = Partition(self.config.num_hidden_layers, s.head, s.tail)
        self.weights = resolve_weights(s.weights, s.device, "edge", is_gguf(model_dir), self.config.dtype)
        shard = load_edge_shard(model_dir, self.partition, dtype=WIRE_DTYPES[s.dtype], device=s.device, config=self.config,
                                weights=self.weights)
        self.linear_kernel = apply_linear_kernel(shard, s.linear_kernel, s.device, copy_shared=s.lm_head_copy)
        shards: dict[str | None, ModelShard] = {None: shard, **load_adapters(shard, s.model, s.adapters)}
        fuse_projections(list(shards.values()))  # before the workers warm their kernels up
        ops = make_block_ops(s.block_ops, s.device, WIRE_DTYPES[s.dtype])
        for shard in shards.values():
            use_block_ops(shard, ops)
        log.info("edge: blocks %s and %s of %d, weights %s, linear %s, block ops %s, adapters: %s",
                 list(self.partition.head_layers), list(self.partition.tail_layers), self.config.num_hidden_layers,
                 self.weights, self.linear_kernel, ops.name, ", ".join(s.adapters) or "none")
        self.workers = {name: EdgeWorker(EdgeModel(shard, self.partition, ops.kernels), compute=s.compute)
                        for name, shard in shards.items()}
        self.worker = self.workers[None]
        self.noise_key = load_or_create_key() if s.noise_key is None else s.noise_key
        if len(self.noise_key) != KEY_BYTES:
            raise ValueError(f"noise_key must be {KEY_BYTES} bytes, got {len(self.noise_key)}")
        self.pseudonymizer = Pseudonymizer(self.noise_key) if s.pseudonymize else None
        self.model_id = f"{model_dir.name}|{self.config.num_hidden_layers}|{self.config.hidden_size}"
        self.prefixes = PrefixStore(s.edge_cache_memory)
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        self.eos_ids = _eos_ids(model_dir, self.tokenizer)
        self.grammars = Grammars(self.tokenizer, self.config.vocab_size, self.eos_ids)
        self.public_ids = public_prefix_ids(self.tokenizer) if s.public_template else []
        self._conns: dict[str, ServerConnection] = {}  # by server URL
        self._decode_loops: dict[str | None, DecodeLoop] = {}  # by adapter
        self._connect_lock: asyncio.Lock | None = None

    # ---- connection ----------------------------------------------------------------------

    @property
    def hello(self) -> Hello:
        return Hello(
            v=PROTOCOL_VERSION,
            num_layers=self.config.num_hidden_layers,
            hidden_size=self.config.hidden_size,
            layers=self.partition.server_range,
            dtype=self.settings.wire_dtype,
        )

    @property
    def connected(self) -> bool:
        """Whether a connection to some server is up now (no reconnect is attempted)."""
        return any(not c.closed for c in self._conns.values())

    async def connection(self, failed: ServerConnection | None = None, elsewhere: bool = False,
                         affinity: bytes | None = None) -> ServerConnection:
        """The shared connection to the best server now, (re)connected on demand: the least
        loaded, or with `affinity` (a session's conversation key) the conversation's own
        server where its load allows (edge_runtime.servers).  `failed`: a connection a
        session found broken or misbehaving: its server is banned for a while and the
        connection closed (its other sessions fail over too); `elsewhere`: never that
        server (NoOtherServer if the list has no other)."""
        if self._connect_lock is None:
            self._connect_lock = asyncio.Lock()
        async with self._connect_lock:
            avoid = failed.url if elsewhere and failed is not None else None
            if not self.servers.order(avoid):
                raise NoOtherServer()
            if failed is not None and self._conns.get(failed.url) is failed:  # the first to report it
                del self._conns[failed.url]
                self.servers.failed(failed.url)
                await failed.close()
            error: Exception | None = None
            for url in self.servers.order(avoid, affinity, self.occupancy):
                conn = self._conns.get(url)
                if conn is None or conn.closed:
                    try:
                        conn = await ServerConnection.connect(
                            url, self.hello, self.settings.server_api_key,
                            max_step_tokens=self.config.max_position_embeddings, server_ca=self.settings.server_ca,
                        )
                    except (OSError, TimeoutError, WebSocketException, ServerError) as e:  # down, refused this edge, or broken
                        log.warning("server runtime %s: %s", url, e)
                        self.servers.failed(url)
                        error = e
                        continue
                    self._check_welcome(conn)
                    self._conns[url] = conn
                if affinity is not None:
                    self.servers.opened(url, affinity)
                return conn
            raise error

    def _check_welcome(self, conn: ServerConnection) -> None:
        """Say once per connection what its server's limits will refuse (each request is
        refused with a typed error too, in stream_choices)."""
        w, s = conn.welcome, self.settings
        if not w.noise_min <= s.noise <= w.noise_max:
            log.error("%s accepts noise in [%s, %s], this edge uses %s: every request will fail",
                      conn.url, w.noise_min, w.noise_max, s.noise)
        missing = sorted(set(s.adapters) - set(w.adapters or []))
        if missing:
            log.error("%s does not serve adapters %s: requests for them will fail", conn.url, missing)

    def occupancy(self, url: str) -> Occupancy:
        """Server `url`'s load as this edge knows it: its sessions there, and the server's
        latest report while it is fresh."""
        conn = self._conns.get(url)
        if conn is None or conn.closed:
            return Occupancy()
        fresh = conn.load is not None and time.monotonic() - conn.load_at <= LOAD_TTL_S
        return Occupancy(len(conn.sessions), conn.load if fresh else None)

    def server_stats(self) -> dict[str, dict]:
        """Each server's load as this edge sees it: its own sessions there, the server's
        latest report (None: none fresh), whether it is banned, and the sessions opened on
        it since start, on their conversation's own server ("home") or not ("away")."""
        stats = {}
        for url in self.servers.urls:
            occupancy = self.occupancy(url)
            stats[url] = {"sessions": occupancy.own, "reported": occupancy.reported, "banned": self.servers.banned(url),
                          "opens": {where: self.servers.opens[url, where] for where in ("home", "away")}}
        return stats

    def stats(self) -> dict:
        """The decode loops' iterations, rows decoded through them and the most rows in one
        iteration (summed over adapters), and the base model's worker's batches."""
        decode = {"iterations": 0, "rows": 0, "max_rows": 0}
        for loop in self._decode_loops.values():
            for k, v in loop.stats().items():
                decode[k] = max(decode[k], v) if k == "max_rows" else decode[k] + v
        return {"decode": decode, "worker": self.worker.stats()}

    async def aclose(self) -> None:
        for conn in self._conns.values():
            await conn.close()
        for worker in self.workers.values():
            worker.close()

    # ---- generation ----------------------------------------------------------------------

    def chat_prompt(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """Token ids of a chat, formatted with the model's own chat template (with the
        tools, OpenAI-style, for a template that takes them); pseudonymized, their
        generations restore the originals."""
        text, pseudonyms = self.chat_text(messages, tools)
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        return PseudonymizedPrompt(ids, pseudonyms) if pseudonyms else ids

    def chat_text(self, messages: list[dict], tools: list[dict] | None = None) -> tuple[str, Pseudonyms | None]:
        """The text `chat_prompt` tokenizes (surrogates in place), and the mapping that
        made them (None when this edge does not pseudonymize)."""
        return chat_text(self.tokenizer, self.pseudonymizer, messages, tools)

    def text_prompt(self, text: str) -> list[int]:
        """Token ids of a raw completion prompt, pseudonymized like `chat_prompt`."""
        pseudonyms = self.pseudonymizer.conversation() if self.pseudonymizer else None
        ids = self.tokenizer(pseudonyms.substitute(text) if pseudonyms else text).input_ids
        return PseudonymizedPrompt(ids, pseudonyms) if pseudonyms else ids

    async def stream(self, messages: list[dict], **params) -> AsyncIterator[TokenEvent]:
        noise = params.pop("noise", None)
        adapter = params.pop("adapter", None)
        async for event in self.stream_tokens(self.chat_prompt(messages), SamplingParams(**params), noise, adapter):
            yield event

    async def generate(self, messages: list[dict], **params) -> Completion:
        prompt = self.chat_prompt(messages)
        noise = params.pop("noise", None)
        adapter = params.pop("adapter", None)
        events = [e async for e in self.stream_tokens(prompt, SamplingParams(**params), noise, adapter)]
        return Completion(
            text="".join(e.text for e in events),
            token_ids=[e.token_id for e in events],
            finish_reason=events[-1].finish_reason,
            prompt_tokens=len(prompt),
            events=events,
        )

    async def stream_tokens(
        self, prompt_ids: list[int], params: SamplingParams, noise: float | None = None, adapter: str | None = None,
        constraint: Constraint | None = None,
    ) -> AsyncIterator[TokenEvent]:
        """Generate after `prompt_ids` with the base model or the named adapter; the last
        event carries finish_reason.  `constraint` (this generation's own, from
        `self.grammars`) restricts each token to what its grammar admits, and ends the
        generation when the grammar is complete."""
        async for _, event in self.stream_choices(prompt_ids, [params], noise, adapter, [constraint]):
            yield event

    async def stream_choices(
        self, prompt_ids: list[int], choices: list[SamplingParams], noise: float | None = None,
        adapter: str | None = None, constraints: list[Constraint | None] | None = None,
    ) -> AsyncIterator[tuple[int, TokenEvent]]:
        """Generate len(choices) continuations of one prompt, yielding (choice, event) as
        they come.  The prompt is sent and prefilled once; the choices fork it.  `seed`
        only seeds sampling: the noise is keyed to the tokens, so every request with the
        same prefix sends the server the same states.  `constraints[i]` is choice i's own
        grammar state (None: free text)."""
        for params in choices:
            params.validate()
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if not choices:
            raise ValueError("no choices to generate")
        constraints = constraints or [None] * len(choices)
        if len(constraints) != len(choices):
            raise ValueError(f"{len(choices)} choices but {len(constraints)} constraints")
        worker = self.workers.get(adapter)
        if worker is None:
            raise ValueError(f"this edge has no adapter {adapter!r} (loaded: {sorted(a for a in self.workers if a) or 'none'})")
        noise = self.settings.noise if noise is None else noise
        conn = await self.connection()
        if adapter is not None and adapter not in (conn.welcome.adapters or []):
            raise ServerError(
                ErrorCode.UNKNOWN_ADAPTER.value,
                f"the server runtime does not serve adapter {adapter!r} (it serves: {conn.welcome.adapters or 'none'}); "
                f"start it with --adapter for the same directory",
            )
        bounds = (conn.welcome.noise_min, conn.welcome.noise_max)
        if not bounds[0] <= noise <= bounds[1]:
            raise ServerError(ErrorCode.NOISE_OUT_OF_BOUNDS.value,
                              f"the server runtime only accepts noise in [{bounds[0]}, {bounds[1]}]; this edge uses {noise}")
        # The edge's own limit too: a step is never longer than the replies its connection accepts,
        # and its blocks never attend past the model's sliding window.
        max_context = min(conn.welcome.max_context, context_limit(self.config))
        n = len(prompt_ids)
        asked = max((p.max_tokens or 1 for p in choices))
        if n + asked > max_context:
            more = f" and {asked} to generate" if any(p.max_tokens for p in choices) else ""
            raise ServerError(ErrorCode.CONTEXT_OVERFLOW.value,
                              f"this model's maximum context length is {max_context} tokens; the prompt has {n}{more}")
        choices = [p if p.max_tokens else dataclasses.replace(p, max_tokens=max_context - n) for p in choices]
        generators = [torch.Generator().manual_seed(p.seed if p.seed is not None else random.getrandbits(63))
                      for p in choices]

        scope = (adapter, noise)
        sessions: list[InferenceSession] = []
        gens: list[Generation] = []
        events: asyncio.Queue = asyncio.Queue()
        try:
            # Prompt scores are the same for every choice: one request asks for them for all.
            scored = choices[0].prompt_logprobs
            session, cache, logits, scores = await self._prefill(worker, prompt_ids, noise, adapter, scope, scored)
            sessions.append(session)
            caches = [cache]
            for _ in choices[1:]:
                sessions.append(await session.fork())
                caches.append(cache.fork(len(prompt_ids)))
            prompt = torch.tensor(prompt_ids)

            def remember(g: Generation) -> None:
                self.prefixes.insert(scope, Prefix(prompt_ids + g.generated[:-1], g.session.sent, g.session.digests,
                                                   g.cache))

            loop = self._decode_loops.setdefault(adapter, DecodeLoop(worker, self.eos_ids))
            for i, (sess, c, params, generator, constraint) in enumerate(zip(sessions, caches, choices, generators,
                                                                              constraints)):
                gens.append(Generation(
                    i, sess, c, prompt, params, generator, constraint, IncrementalDetokenizer(self.tokenizer),
                    output_text(prompt_ids, StopMatcher(params.stop)), max_context, events, remember,
                    logits=logits, prompt_scores=scores, pos=len(prompt_ids),
                ))
                loop.add(gens[-1])
            running = len(gens)
            while running:
                i, item = await events.get()
                if item is None:
                    running -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield i, item
        finally:
            # Close even when the consumer stops early (a client disconnect cancels us).
            for g in gens:
                await asyncio.shield(g.cancel())
            for s in sessions:
                await asyncio.shield(s.close())

    async def _prefill(self, worker, prompt_ids, noise, adapter, scope, scored: int | None):
        """Open a session holding the prompt; return it, the edge cache, the logits of the
        prompt's last token and, if `scored` (top alternatives) is set, the prompt's scores.
        A stored prefix of the prompt is neither recomputed on the edge nor sent in a new
        version to the server.  Scoring needs the tail over the whole prompt, so it reuses
        nothing (the keyed noise still gives the server the states it saw before)."""
        n = len(prompt_ids)
        m, prior = self.prefixes.lookup(scope, prompt_ids) if scored is None else (0, None)
        reuse = min(m, n - 1)  # the last token's logits are always computed afresh
        # Head K/V is reused up to m; the tail's from `reuse` on is overwritten below.
        cache = prior.cache.fork(m) if prior is not None else SequenceCache()
        session = self.new_session(noise, adapter, prior.sent[:m] if prior is not None else None,
                                   prior.digests[:m] if prior is not None else [],
                                   public_prefix_len(prompt_ids, self.public_ids))
        try:
            # The states first: they place the session among the servers (its affinity key).
            new = torch.tensor(prompt_ids[m:], dtype=torch.long)
            hidden = await worker.head(cache, m, new) if m < n else torch.empty(0, self.config.hidden_size, dtype=worker.model.dtype)
            session.keep(hidden, prompt_ids[m:])
            await session.open(upto=reuse)
            out = await session.step(hidden[:0], [])
            logits = await worker.tail(cache, reuse, out[out.shape[0] - (n - reuse):], every=scored is not None)
        except BaseException:
            await asyncio.shield(session.close())
            raise
        if scored is None:
            return session, cache, logits, None
        return session, cache, logits[-1], score_prompt(logits, torch.tensor(prompt_ids), scored)

    def new_session(self, noise: float, adapter: str | None = None, prior: torch.Tensor | None = None,
                    prior_digests: list[bytes] = (), public: int = 0) -> InferenceSession:
        """A server session (not yet open) whose noise is keyed by this edge's key;
        `prior`: the states sent before for the first len(prior) tokens, with their digests;
        `public`: leading positions of public template tokens, sent un-noised."""
        chain = NoiseChain(self.noise_key, self.model_id, (self.partition.head, self.partition.tail), noise, adapter)
        if prior_digests:
            chain.seek(prior_digests[-1], len(prior_digests))
        hello = self.hello
        root = prefix_root(hello.num_layers, hello.hidden_size, hello.layers, hello.dtype, adapter)
        return InferenceSession(self.connection, noise, chain, root, WIRE_DTYPES[self.settings.wire_dtype], prior, prior_digests,
                                adapter=adapter, public=public)


def _eos_ids(model_dir, tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    try:
        eos = GenerationConfig.from_pretrained(str(model_dir), local_files_only=True).eos_token_id
    except OSError:
        eos = None
    ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return ids


class EdgeClient:
    """Synchronous facade: runs an AsyncEdgeClient on a private event-loop thread."""

    def __init__(self, settings: EdgeSettings | str | list[str] | None = None, /, **options):
        """As `AsyncEdgeClient`: an `EdgeSettings`, or a server URL and its options."""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve_loop, name="fedsea-edge-loop", daemon=True)
        self._thread.start()
        self._client = AsyncEdgeClient(settings, **options)

    def _serve_loop(self) -> None:
        serial()  # the loop only moves small tensors; the edge worker computes
        self._loop.run_forever()

    @property
    def tokenizer(self):
        return self._client.tokenizer

    @property
    def public_ids(self) -> list[int]:
        """The chat template's public prefix, sent un-noised (empty when that is off)."""
        return self._client.public_ids

    def chat_prompt(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """The token ids a chat is sent as (see AsyncEdgeClient.chat_prompt)."""
        return self._client.chat_prompt(messages, tools)

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def generate(self, messages: list[dict], **params) -> Completion:
        return self._run(self._client.generate(messages, **params))

    def stream(self, messages: list[dict], **params) -> Iterator[TokenEvent]:
        agen = self._client.stream(messages, **params)
        try:
            while True:
                try:
                    yield self._run(agen.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            self._run(agen.aclose())

    def close(self) -> None:
        self._run(self._client.aclose())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

    def __enter__(self) -> "EdgeClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
