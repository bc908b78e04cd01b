"""The edge API an application embeds.

    with EdgeClient("ws://127.0.0.1:8765") as client:
        for event in client.stream([{"role": "user", "content": "Hi"}], max_tokens=64):
            print(event.text, end="")

`AsyncEdgeClient` is the asyncio core (the gateway uses it); `EdgeClient` runs it on a
background event loop for synchronous code.  Both share one connection to the server
runtime among all concurrent generations, and one `EdgeWorker` that batches their head
and tail work.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
from dataclasses import dataclass, field
from typing import AsyncIterator, Iterator

import torch
from transformers import AutoTokenizer, GenerationConfig

from fedsea_shared import defaults
from fedsea_shared.adapters import load_adapters
from fedsea_shared.models import resolve_model
from fedsea_shared.noise import public_prefix_len
from fedsea_shared.protocol import PROTOCOL_VERSION, WIRE_DTYPES, ErrorCode, Hello
from fedsea_shared.shard import Partition, load_config, load_edge_shard

from .connection import ServerConnection, ServerError
from .model import EdgeModel, EdgeWorker, SequenceCache
from .sampling import SamplingParams, sample
from .session import InferenceSession
from .text import IncrementalDetokenizer, StopMatcher

log = logging.getLogger("fedsea.edge")


@dataclass
class TokenEvent:
    token_id: int
    text: str  # text this token adds (may be "" while a character is incomplete)
    logprob: float
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None  # "stop" or "length" on the last event


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
    def __init__(
        self,
        server_url: str = f"ws://127.0.0.1:{defaults.SERVER_PORT}",
        model: str = defaults.MODEL,
        head: int = defaults.HEAD,
        tail: int = defaults.TAIL,
        noise: float = defaults.NOISE,
        dtype: str = "float32",
        wire_dtype: str = "float32",
        device: str = "cpu",
        api_key: str | None = None,
        adapters: dict[str, str] | None = None,
        public_template: bool = defaults.PUBLIC_TEMPLATE,
    ):
        """`adapters`: fine-tuned LoRA adapters by name (-> directory) a generation may
        pick; the server must serve each under the same name.  `public_template`: send
        the chat template's public prefix (default system turn, user header) un-noised
        (see fedsea_shared.noise.public_prefix_len)."""
        if wire_dtype not in WIRE_DTYPES:
            raise ValueError(f"wire_dtype must be one of {sorted(WIRE_DTYPES)}")
        self.server_url = server_url
        self.noise = noise
        self.wire_dtype = wire_dtype
        self.api_key = api_key
        model_dir = resolve_model(model)
        self.config = load_config(model_dir)
        self.partition = Partition(self.config.num_hidden_layers, head, tail)
        shard = load_edge_shard(model_dir, self.partition, dtype=WIRE_DTYPES[dtype], device=device, config=self.config)
        self.worker = EdgeWorker(EdgeModel(shard, self.partition))
        self.workers: dict[str | None, EdgeWorker] = {None: self.worker}
        for name, adapted in load_adapters(shard, model, adapters or {}).items():
            self.workers[name] = EdgeWorker(EdgeModel(adapted, self.partition))
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        self.eos_ids = _eos_ids(model_dir, self.tokenizer)
        self.public_ids = _public_prefix_ids(self.tokenizer) if public_template else []
        self._conn: ServerConnection | None = None
        self._connect_lock: asyncio.Lock | None = None

    # ---- connection ----------------------------------------------------------------------

    @property
    def hello(self) -> Hello:
        return Hello(
            v=PROTOCOL_VERSION,
            num_layers=self.config.num_hidden_layers,
            hidden_size=self.config.hidden_size,
            layers=self.partition.server_range,
            dtype=self.wire_dtype,
        )

    @property
    def connected(self) -> bool:
        """Whether the shared connection is up now (no reconnect is attempted)."""
        return self._conn is not None and not self._conn.closed

    async def connection(self) -> ServerConnection:
        """The shared connection, (re)connected on demand."""
        if self._connect_lock is None:
            self._connect_lock = asyncio.Lock()
        async with self._connect_lock:
            if self._conn is None or self._conn.closed:
                self._conn = await ServerConnection.connect(self.server_url, self.hello, self.api_key)
            return self._conn

    async def aclose(self) -> None:
        if self._conn is not None:
            await self._conn.close()
        for worker in self.workers.values():
            worker.close()

    # ---- generation ----------------------------------------------------------------------

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        """Token ids of a chat, formatted with the model's own chat template."""
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False).input_ids

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
        self, prompt_ids: list[int], params: SamplingParams, noise: float | None = None, adapter: str | None = None
    ) -> AsyncIterator[TokenEvent]:
        """Generate after `prompt_ids` with the base model or the named adapter; the last
        event carries finish_reason."""
        params.validate()
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        worker = self.workers.get(adapter)
        if worker is None:
            raise ValueError(f"this edge has no adapter {adapter!r} (loaded: {sorted(a for a in self.workers if a) or 'none'})")
        noise = self.noise if noise is None else noise
        conn = await self.connection()
        if adapter is not None and adapter not in (conn.welcome.adapters or []):
            raise ServerError(
                ErrorCode.UNKNOWN_ADAPTER.value,
                f"the server runtime does not serve adapter {adapter!r} (it serves: {conn.welcome.adapters or 'none'}); "
                f"start it with --adapter for the same directory",
            )
        bounds = (conn.welcome.noise_min, conn.welcome.noise_max)
        if not bounds[0] <= noise <= bounds[1]:
            raise ValueError(f"noise {noise} is outside the server's bounds [{bounds[0]}, {bounds[1]}]")
        max_context = conn.welcome.max_context
        if len(prompt_ids) >= max_context:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens; the context limit is {max_context}")
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        noise_gen = torch.Generator().manual_seed(seed)
        sample_gen = torch.Generator().manual_seed(seed ^ 0x5DEECE66D)

        public = public_prefix_len(prompt_ids, self.public_ids)
        session = InferenceSession(self.connection, noise, noise_gen, adapter=adapter, public=public)
        try:
            await session.open()
            async for event in self._decode(worker, session, prompt_ids, params, sample_gen, max_context):
                yield event
        finally:
            # Close even when the consumer stops early (a client disconnect cancels us).
            await asyncio.shield(session.close())

    async def _decode(self, worker, session, prompt_ids, params, sample_gen, max_context) -> AsyncIterator[TokenEvent]:
        cache = SequenceCache()
        prompt = torch.tensor(prompt_ids)
        generated: list[int] = []
        detok = IncrementalDetokenizer(self.tokenizer)
        stops = StopMatcher(params.stop)
        pos, x = 0, prompt
        while True:
            hidden = await worker.head(cache, pos, x)
            out = await session.step(hidden)
            logits = await worker.tail(cache, pos, out)
            pos += x.shape[0]
            s = sample(logits, params, sample_gen, prompt, torch.tensor(generated, dtype=torch.long))
            generated.append(s.token_id)
            event = TokenEvent(s.token_id, "", s.logprob, s.top)
            if s.token_id in self.eos_ids:
                event.text, event.finish_reason = stops.flush(), "stop"
            else:
                event.text, stopped = stops.push(detok.push(s.token_id))
                if stopped:
                    event.finish_reason = "stop"
                elif len(generated) >= params.max_tokens or pos + 1 >= max_context:
                    event.text += stops.flush()
                    event.finish_reason = "length"
            yield event
            if event.finish_reason:
                return
            x = torch.tensor([s.token_id])


def _public_prefix_ids(tokenizer) -> list[int]:
    """Token ids the chat template puts before the first user message's content."""
    sentinel = "\x00fedsea-user-content\x00"
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": sentinel}], tokenize=False)
    except ValueError:  # no chat template: nothing is known to be public
        return []
    return tokenizer(text[: text.index(sentinel)], add_special_tokens=False).input_ids


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

    def __init__(self, server_url: str = f"ws://127.0.0.1:{defaults.SERVER_PORT}", **kwargs):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fedsea-edge-loop", daemon=True)
        self._thread.start()
        self._client = AsyncEdgeClient(server_url, **kwargs)

    @property
    def tokenizer(self):
        return self._client.tokenizer

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
