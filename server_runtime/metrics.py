"""Prometheus metrics of one server runtime (a registry per instance, so several can run
in one process, as the tests do)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.sessions = Gauge("fedsea_sessions", "Open sessions", registry=r)
        self.connections = Gauge("fedsea_connections", "Open edge connections", registry=r)
        self.kv_blocks_used = Gauge("fedsea_kv_blocks_used", "KV pool blocks in use", registry=r)
        self.kv_blocks_free = Gauge("fedsea_kv_blocks_free", "KV pool blocks free", registry=r)
        self.kv_blocks_cached = Gauge("fedsea_kv_blocks_cached", "KV blocks holding a cached prefix (in use or evictable)", registry=r)
        self.prefix_evictions = Gauge("fedsea_prefix_cache_evictions", "Cached blocks evicted to make room, since start", registry=r)
        self.prefix_queries = Counter("fedsea_prefix_cache_query_tokens", "Tokens of prefixes edges asked the cache for", registry=r)
        self.prefix_hits = Counter("fedsea_prefix_cache_hit_tokens", "Tokens of those prefixes the cache held", registry=r)
        self.preemptions = Counter("fedsea_preemptions", "Sessions whose KV blocks were taken for an older session (its edge re-sends)", registry=r)
        self.queue_depth = Gauge("fedsea_queue_depth", "Steps waiting for the model", registry=r)
        self.tokens_per_tick = Histogram(
            "fedsea_tokens_per_tick", "Tokens in one batched forward", registry=r,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096),
        )
        self.queue_wait = Histogram("fedsea_queue_wait_seconds", "Time a step waits before its first chunk runs", registry=r)
        self.step_latency = Histogram("fedsea_step_latency_seconds", "Time from a step's arrival to its output", registry=r)
        self.tick_seconds = Histogram("fedsea_tick_seconds", "Duration of one batched forward", registry=r)
        self.tokens = Counter("fedsea_tokens", "Tokens through the middle blocks", registry=r)
        self.received_bytes = Counter("fedsea_received_bytes", "Bytes of frames received from edges", registry=r)
        self.errors = Counter("fedsea_errors", "Refused messages by error code", ["code"], registry=r)
        self.training_jobs = Gauge("fedsea_training_jobs", "Split fine-tuning jobs held", registry=r)
        self.training_memory = Gauge("fedsea_training_memory_bytes", "Training memory charged (of --training-memory)", registry=r)

        self.tensor_parallel_ranks = Gauge("fedsea_tensor_parallel_ranks", "Ranks the middle blocks run on", registry=r)
        self.tensor_parallel_ranks.set(1)
        self.tensor_parallel_healthy = Gauge("fedsea_tensor_parallel_healthy", "1 while every rank answers", registry=r)
        self.tensor_parallel_healthy.set(1)
        self.tensor_parallel_allreduce_seconds = Histogram(
            "fedsea_tensor_parallel_allreduce_seconds", "Rank 0's time in all-reduces, per tick", registry=r,
            buckets=(1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0))
        self.tensor_parallel_allreduce_bytes = Counter(
            "fedsea_tensor_parallel_allreduce_bytes", "Bytes rank 0 all-reduced (partial sums of o_proj, down_proj)", registry=r)
        self.tensor_parallel_broadcast_seconds = Histogram(
            "fedsea_tensor_parallel_broadcast_seconds", "Rank 0's time sending a tick's plan and rows, per tick", registry=r,
            buckets=(1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1))
        self.tensor_parallel_broadcast_bytes = Counter(
            "fedsea_tensor_parallel_broadcast_bytes", "Bytes of plans and input rows rank 0 broadcast", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
