"""A federated split fine-tuning run: N client processes against one server runtime.

Each client owns a disjoint shard of the data, its own edge (head + tail LoRA) and one
connection.  Every `fedavg_every` steps the clients average their edge adapters through
the server's aggregation endpoint and checkpoint; client 0 also validates, fetches the
server's half of each checkpoint and writes the final adapter and report.  Without
`server`, the run starts an embedded server runtime in this process.

Failures: a client process that dies stops the run at once (the others are terminated,
so nobody waits at a barrier for it) and a rerun resumes every client from the latest
checkpoint they all have intact, exactly (the server's half included).  When the
server is lost mid-job, each client reloads its last checkpoint and rejoins on the next
of the `server` list (client 0 uploading the server's state), and gives up only after
every server failed once without a checkpoint in between.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import multiprocessing as mp
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from tqdm import tqdm
from transformers import AutoTokenizer

from edge_runtime.connection import ConnectionLost, ServerError
from edge_runtime.servers import rendezvous
from fedsea_shared import defaults
from fedsea_shared.architectures import check_context
from fedsea_shared.layers.linear import available_memory
from fedsea_shared.models import resolve_model
from fedsea_shared.noise import public_prefix_ids
from fedsea_shared.protocol import Hello, LoraSpec, OptimSpec, TrainJoin, TrainMode
from fedsea_shared.shard import Partition, load_config

from .checkpoint import Checkpoints, save_adapter, server_adapter_names
from .connection import ServerCheckpoint, TrainingConnection
from .data import Dataset, DataError, Example, build_dataset, shard
from .edge import EdgeTrainer

log = logging.getLogger("fedsea.finetune")

WATCH_INTERVAL = 0.2  # seconds between checks that every client process is alive
JOIN_WAIT = 60.0  # seconds a resuming client waits for client 0 to bring the job's server state


class FinetuneConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data: str
    out: str
    model: str = defaults.MODEL
    head: int = defaults.HEAD
    tail: int = defaults.TAIL
    noise: float = Field(defaults.NOISE, ge=0)
    public_template: bool = defaults.PUBLIC_TEMPLATE  # the chat template's public prefix goes un-noised, as in serving
    weights: Literal["float32", "bfloat16", "float16", "int8", "int4"] = "float32"  # the frozen base's weight format on the edge and an embedded server (QLoRA-style when quantized)
    send_grad_clip: float = Field(0.0, ge=0)  # per-sample L2 bound on the gradient sent to the server (0: off)
    send_grad_noise: float = Field(0.0, ge=0)  # Gaussian noise on it, std as a multiple of the bound
    clients: int = Field(1, ge=1)
    mode: TrainMode = "sequential"
    steps: int | None = Field(None, ge=1)  # per client; else derived from epochs
    epochs: float = Field(1.0, gt=0)
    batch_size: int = Field(8, ge=1)
    max_length: int = Field(256, ge=8)
    lora: LoraSpec = LoraSpec()
    optim: OptimSpec = OptimSpec()
    fedavg_every: int = Field(10, ge=1)  # R: local steps between FedAvg rounds (and checkpoints)
    # What the clients' edges average: "adapters", FedAvg every R steps, each client stepping
    # AdamW on its own batches in between (the paper's); "gradients", every optimizer step
    # before stepping (FedSGD), so the edges stay one adapter trained on all clients' batches;
    # the server then sees each client's edge gradient every step.
    average: Literal["adapters", "gradients"] = "adapters"
    eval_every: int = Field(0, ge=0)  # steps between validations (0: before and after only)
    eval_batch_size: int = Field(16, ge=1)
    by_label: bool = False  # non-IID shards: each client gets a run of the label-sorted data
    valid_fraction: float = Field(0.1, gt=0, lt=1)
    max_train: int | None = Field(None, ge=1)
    max_valid: int | None = Field(None, ge=1)
    seed: int = 0
    server: list[str] | None = None  # ws:// or wss://host:port, in failover order; None: embedded server runtime
    server_ca: str | None = None  # PEM verifying a wss:// server (default: the system trust store)
    server_api_key: str | None = Field(None, repr=False)  # the key presented to the server runtime
    progress: bool = True

    @field_validator("server", mode="before")
    @classmethod
    def _one_server(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value or None

    @model_validator(mode="after")
    def _check(self) -> "FinetuneConfig":
        if self.send_grad_noise > 0 and self.send_grad_clip <= 0:
            raise ValueError("send_grad_noise is relative to the clip bound: set send_grad_clip too")
        return self

    @property
    def job(self) -> str:
        """Stable across reruns of the same --out (and across servers, for failover)."""
        path = str(Path(self.out).resolve())
        return f"{Path(self.out).name[:40] or 'run'}-{hashlib.sha1(path.encode()).hexdigest()[:8]}".replace(" ", "_")

    def fingerprint(self) -> dict:
        """Settings a resumed run must share with the checkpoints it resumes."""
        return self.model_dump(include={"data", "model", "head", "tail", "clients", "mode", "lora", "seed", "by_label", "batch_size"})


def client_batch(examples: list[Example], seed: int, client: int, step: int, size: int, steps_per_epoch: int) -> list[Example]:
    """The batch of a step: a fixed function of (seed, client, step), so a resumed run
    sees exactly the batches the crashed one would have, and a centralized baseline
    (benchmarks/quality.py) the batches of a one-client run."""
    epoch, index = divmod(step, steps_per_epoch)
    order = list(range(len(examples)))
    random.Random(f"{seed}-{client}-{epoch}").shuffle(order)
    picked = order[(index * size) % len(order):][:size] or order[:size]
    return [examples[i] for i in picked]


def steps_per_epoch(train: int, clients: int, batch_size: int) -> int:
    """Every client runs the same number of steps so FedAvg rounds line up."""
    return max(1, train // clients // batch_size)


class ClientRun:
    """One client's training loop."""

    def __init__(self, cfg: FinetuneConfig, client: int, servers: list[str], resume_step: int):
        self.cfg = cfg
        self.client = client
        # The job's own order of the servers: every client of a job starts on the same one
        # and fails over in the same order (they aggregate there together), while
        # different jobs spread over the replicas.
        self.servers = rendezvous(cfg.job.encode(), servers)
        self.saved_step = resume_step  # of the latest checkpoint this client wrote or resumed
        model_dir = resolve_model(cfg.model)
        self.config = load_config(model_dir)
        self.partition = Partition(self.config.num_hidden_layers, cfg.head, cfg.tail)
        if cfg.max_length > self.config.max_position_embeddings:
            raise DataError(f"--max-length {cfg.max_length} exceeds the model's context of {self.config.max_position_embeddings} tokens")
        check_context(self.config, cfg.max_length, "--max-length")
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        self.dataset: Dataset = build_dataset(
            cfg.data, self.tokenizer, cfg.max_length, cfg.seed, cfg.valid_fraction, cfg.max_train, cfg.max_valid
        )
        self.examples = shard(self.dataset.train, cfg.clients, client, cfg.by_label)
        self.steps_per_epoch = steps_per_epoch(len(self.dataset.train), cfg.clients, cfg.batch_size)
        self.total_steps = cfg.steps or math.ceil(cfg.epochs * self.steps_per_epoch)
        self.optim = cfg.optim.model_copy(update={"total_steps": max(1, math.ceil(self.total_steps / cfg.optim.grad_accum))})
        self.model_dir = model_dir
        self.trainer = self._new_trainer()
        self.checkpoints = Checkpoints(Path(cfg.out) / "checkpoint")
        self.label_tokens = self._label_tokens()

    def _new_trainer(self) -> EdgeTrainer:
        cfg = self.cfg
        return EdgeTrainer(self.model_dir, self.partition, cfg.lora, self.optim, cfg.noise, seed=cfg.seed, weights=cfg.weights,
                           send_grad_clip=cfg.send_grad_clip, send_grad_noise=cfg.send_grad_noise,
                           public_ids=public_prefix_ids(self.tokenizer) if cfg.public_template else None)

    def _label_tokens(self) -> dict[str, int] | None:
        if not self.dataset.labels:
            return None
        first = {label: self.tokenizer(label, add_special_tokens=False).input_ids[0] for label in self.dataset.labels}
        if len(set(first.values())) < len(first):
            log.warning("labels share their first token; accuracy is not measured")
            return None
        return first

    def batch(self, step: int) -> list[Example]:
        return client_batch(self.examples, self.cfg.seed, self.client, step, self.cfg.batch_size, self.steps_per_epoch)

    def hello(self) -> Hello:
        return Hello(num_layers=self.config.num_hidden_layers, hidden_size=self.config.hidden_size,
                     layers=self.partition.server_range, dtype="float32")

    async def evaluate(self, conn: TrainingConnection) -> dict[str, float]:
        return await self.trainer.evaluate(conn, self.dataset.valid, self.label_tokens, self.cfg.eval_batch_size)

    def _restore(self) -> tuple[dict | None, ServerCheckpoint | None]:
        """Back to this client's latest checkpoint (or to the start): (its state, the server's half)."""
        if not self.saved_step:
            self.trainer = self._new_trainer()
            return None, None
        state, server = self.checkpoints.load(self.client, self.saved_step)
        self.trainer.load_adapter_vector(state["edge"])
        self.trainer.optimizer.load_state_dict(state["optimizer"])
        self.trainer.load_rng_state(state["rng"])
        return state, server

    async def run(self) -> dict | None:
        """Train to the end, failing over to the next server when one is lost."""
        state, server_state = self._restore() if self.saved_step else (None, None)
        index, failures = 0, 0
        while True:
            url = self.servers[index % len(self.servers)]
            before = self.saved_step
            try:
                return await self._run_on(url, state, server_state)
            except ConnectionLost as e:
                failures = 1 if self.saved_step > before else failures + 1
                if failures >= len(self.servers):
                    raise ConnectionLost(f"{e.message} ({url}); no other server left to fail over to") from None
                index += 1
                log.warning("client %d: lost server %s (%s); resuming from the checkpoint of step %d on %s",
                            self.client, url, e.message, self.saved_step, self.servers[index % len(self.servers)])
                state, server_state = self._restore()

    async def _connect(self, url: str) -> TrainingConnection:
        try:
            return await TrainingConnection.connect(url, self.hello(), self.cfg.server_api_key, server_ca=self.cfg.server_ca)
        except (OSError, TimeoutError) as e:
            raise ConnectionLost(f"cannot reach the server runtime at {url} ({e})") from None

    async def _join(self, conn: TrainingConnection, rnd: int, server_state: ServerCheckpoint | None) -> None:
        cfg = self.cfg
        join = TrainJoin(sid=0, job=cfg.job, client=self.client, clients=cfg.clients, mode=cfg.mode,
                         lora=cfg.lora, optim=self.optim, seed=cfg.seed, round=rnd)
        deadline = time.monotonic() + JOIN_WAIT
        while True:
            try:
                await conn.join(join, resume=server_state)
                return
            except ServerError as e:
                # A resumed job is created by the client holding the server's state (client 0).
                if e.code != "unknown_job" or server_state is not None or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)

    async def _run_on(self, url: str, state: dict | None, server_state: ServerCheckpoint | None) -> dict | None:
        step, rnd = (state["step"], state["round"]) if state else (0, 0)
        conn = await self._connect(url)
        try:
            await self._join(conn, rnd, server_state)
            report = None
            if self.client == 0:
                report = state["report"] if state else {"before": await self.evaluate(conn)}
                log.info("validation before: %s", _fmt(report["before"]))
            # A first FedAvg round as a start line: every client waits for the others
            # (and for client 0's validation) and starts from the same edge adapter.
            avg, _ = await conn.aggregate(rnd, 1, self.trainer.adapter_vector())
            self.trainer.load_adapter_vector(avg)
            await self._train(conn, step, rnd + 1, report)
            if self.client == 0:
                report["after"] = await self.evaluate(conn)
                log.info("validation after: %s", _fmt(report["after"]))
                await self._save_adapter(conn)
            await conn.leave()
            return report
        finally:
            await conn.close()

    async def _train(self, conn: TrainingConnection, step: int, rnd: int, report: dict | None) -> None:
        cfg = self.cfg
        bar = tqdm(total=self.total_steps, initial=step, position=self.client, desc=f"client {self.client}",
                   disable=not cfg.progress, dynamic_ncols=True, leave=True)
        samples, tokens, since, started = 0, 0, 0, time.perf_counter()
        while step < self.total_steps:
            batch = self.batch(step)
            average_round = rnd if cfg.average == "gradients" else None
            loss, stepped = await self.trainer.train_step(conn, batch, average_round)
            if stepped and average_round is not None:
                rnd += 1
            step += 1
            samples += len(batch)
            since += len(batch)
            tokens += sum(len(ex.ids) for ex in batch)
            elapsed = time.perf_counter() - started
            bar.set_postfix(loss=f"{loss:.3f}", samples_s=f"{samples / elapsed:.2f}", tok_s=f"{tokens / elapsed:.0f}")
            bar.update()
            if step % cfg.fedavg_every == 0 or step == self.total_steps:
                avg, _ = await conn.aggregate(rnd, since, self.trainer.adapter_vector(), checkpoint=self.client == 0)
                self.trainer.load_adapter_vector(avg)
                rnd, since = rnd + 1, 0
                server = await conn.checkpoint() if self.client == 0 else None
                state = {"step": step, "round": rnd, "edge": avg, "optimizer": self.trainer.optimizer.state_dict(),
                         "rng": self.trainer.rng_state(), "report": report}
                self.checkpoints.save(self.client, step, state, server)
                self.saved_step = step
            if report is not None and cfg.eval_every and step % cfg.eval_every == 0 and step < self.total_steps:
                result = await self.evaluate(conn)
                report.setdefault("during", []).append({"step": step, **result})
                bar.write(f"step {step}: validation {_fmt(result)}")
        bar.close()
        if report is not None:
            elapsed = time.perf_counter() - started
            report["train"] = {"steps": self.total_steps, "samples": samples, "tokens": tokens, "seconds": elapsed}

    async def _save_adapter(self, conn: TrainingConnection) -> None:
        server_flat = await conn.export()
        names = server_adapter_names(self.config, self.partition, self.cfg.lora)
        save_adapter(Path(self.cfg.out) / "adapter", self.cfg.model, self.cfg.lora, self.partition,
                     dict(self.trainer.params), names, server_flat)


def _fmt(result: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in result.items())


def _client_main(cfg_json: str, client: int, servers: list[str], resume_step: int, threads: int) -> None:
    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s client {client} %(levelname)s %(name)s: %(message)s")
    cfg = FinetuneConfig.model_validate_json(cfg_json)
    try:
        report = asyncio.run(ClientRun(cfg, client, servers, resume_step).run())
    except (ServerError, DataError, OSError) as e:
        sys.exit(f"client {client}: {e}")
    if report is not None:
        _write_report(cfg, report)


def _write_report(cfg: FinetuneConfig, report: dict) -> None:
    report = {"config": json.loads(cfg.model_dump_json()), **report}
    (Path(cfg.out) / "report.json").write_text(json.dumps(report, indent=2) + "\n")


def run(cfg: FinetuneConfig) -> dict:
    """Train (resuming from cfg.out's checkpoints if any) and return client 0's report."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    fingerprint = out / "run.json"
    if fingerprint.is_file() and json.loads(fingerprint.read_text()) != json.loads(json.dumps(cfg.fingerprint())):
        raise ValueError(f"{out} holds a run with other settings ({fingerprint}); pick another --out or delete it")
    fingerprint.write_text(json.dumps(cfg.fingerprint(), indent=2) + "\n")
    resume_step = Checkpoints(out / "checkpoint").common_step(cfg.clients)
    if resume_step:
        log.info("resuming all %d clients from the checkpoint of step %d", cfg.clients, resume_step)
    server = None
    if cfg.server is None:
        from server_runtime.app import ServerSettings, ServerThread
        from server_runtime.training_service import TrainingSettings

        # It trains this job alone, in this process: its budget is the memory free here, not
        # a shared server's share (2 GiB refused one step of 8 BBC articles).
        memory = max(TrainingSettings.memory, (available_memory() or 0) // 2)
        server = ServerThread(ServerSettings(model=cfg.model, head=cfg.head, tail=cfg.tail, port=0, weights=cfg.weights, kv_cache_memory="64MiB",
                                            enable_training=True, training=TrainingSettings(memory=memory)))
    servers = cfg.server or [server.url]
    started = time.perf_counter()
    try:
        if cfg.clients == 1:
            try:
                report = asyncio.run(ClientRun(cfg, 0, servers, resume_step).run())
            except ServerError as e:
                raise RuntimeError(f"client 0: {e}; {_resume_hint(cfg)}") from None
            _write_report(cfg, report)
        else:
            _run_processes(cfg, servers, resume_step)
    finally:
        if server is not None:
            server.stop()
    report = json.loads((out / "report.json").read_text())
    report["wall_seconds"] = time.perf_counter() - started
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _run_processes(cfg: FinetuneConfig, servers: list[str], resume_step: int) -> None:
    ctx = mp.get_context("spawn")  # a clean interpreter per client: no shared torch state
    threads = max(1, (os.cpu_count() or 1) // cfg.clients)
    procs = [ctx.Process(target=_client_main, args=(cfg.model_dump_json(), c, servers, resume_step, threads), name=f"client{c}")
             for c in range(cfg.clients)]
    for p in procs:
        p.start()
    try:
        # Watch them all: one that dies stops the run now, rather than leaving the others
        # to wait for it at the server's start line or at a FedAvg round.
        while any(p.exitcode is None for p in procs):
            failed = next((p for p in procs if p.exitcode not in (None, 0)), None)
            if failed is not None:
                raise RuntimeError(f"{failed.name} exited with code {failed.exitcode} (see its messages above); "
                                   f"stopped the other clients; {_resume_hint(cfg)}")
            time.sleep(WATCH_INTERVAL)
    finally:
        for p in procs:
            if p.exitcode is None:
                p.terminate()
        for p in procs:
            p.join()
    failed = [p.name for p in procs if p.exitcode != 0]
    if failed:
        raise RuntimeError(f"{', '.join(failed)} failed (see their messages above); {_resume_hint(cfg)}")


def _resume_hint(cfg: FinetuneConfig) -> str:
    return f"rerun the same command to resume from the last checkpoint in {Path(cfg.out) / 'checkpoint'}"
