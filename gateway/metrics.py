"""Prometheus metrics of one gateway (a registry per app, so tests can run several)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("fedsea_gateway_requests", "HTTP requests by path and status", ["path", "status"], registry=r)
        self.ready = Gauge("fedsea_gateway_ready", "1 when the edge is loaded and connected to the server runtime", registry=r)
        self.running = Gauge("fedsea_gateway_generations_running", "Generations (choices) in flight", registry=r)
        self.prompt_tokens = Counter("fedsea_gateway_prompt_tokens", "Prompt tokens of started generations", registry=r)
        self.generation_tokens = Counter("fedsea_gateway_generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("fedsea_gateway_time_to_first_token_seconds", "Request arrival to a choice's first token", buckets=LATENCY_BUCKETS, registry=r)
        self.inter_token = Histogram("fedsea_gateway_inter_token_seconds", "Time between a choice's consecutive tokens", buckets=LATENCY_BUCKETS, registry=r)
        self.finished = Counter("fedsea_gateway_generations_finished", "Finished generations by finish reason", ["reason"], registry=r)
        # The edge's prefix store (edge_runtime.prefix_cache), read from its stats() at scrape time.
        self.edge_prefix = {
            key: Gauge(f"fedsea_gateway_edge_prefix_{key}", help, registry=r) for key, help in (
                ("query_tokens", "Prompt tokens looked up in the edge prefix store, since start"),
                ("hit_tokens", "Of those, tokens whose edge state was reused"),
                ("entries", "Token sequences the edge prefix store holds"),
                ("bytes", "Memory the edge prefix store holds"),
            )
        }

        # Each server runtime's load as the edge sees it (AsyncEdgeClient.server_stats), at scrape time.
        server = ["server"]
        self.server_sessions = Gauge("fedsea_gateway_server_sessions", "This edge's sessions open on the server", server, registry=r)
        self.server_reported = {
            key: Gauge(f"fedsea_gateway_server_reported_{key}", help, server, registry=r) for key, help in (
                ("sessions", "Sessions the server reports open (all edges; -1: no fresh report)"),
                ("waiting", "Steps and opens the server reports waiting for KV blocks (-1: no fresh report)"),
                ("free_blocks", "KV blocks the server reports free or evictable (-1: no fresh report)"),
            )
        }
        self.server_banned = Gauge("fedsea_gateway_server_banned", "1 while the server is banned after a failure", server, registry=r)
        self.server_opens = Gauge("fedsea_gateway_server_opens", "Sessions opened on the server since start, on their "
                                  "conversation's own server (affinity=home) or another (away: it was loaded or banned)",
                                  ["server", "affinity"], registry=r)

    def observe_servers(self, stats: dict[str, dict]) -> None:
        for url, s in stats.items():
            self.server_sessions.labels(url).set(s["sessions"])
            for key, gauge in self.server_reported.items():
                gauge.labels(url).set(-1 if s["reported"] is None else getattr(s["reported"], key))
            self.server_banned.labels(url).set(int(s["banned"]))
            for where, n in s["opens"].items():
                self.server_opens.labels(url, where).set(n)

    def observe_edge_prefixes(self, stats: dict[str, int]) -> None:
        for key, gauge in self.edge_prefix.items():
            gauge.set(stats[key])

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestCounter:
    """ASGI middleware counting responses by path and status.  Plain ASGI rather than
    Starlette's BaseHTTPMiddleware, which would sit between a stream and the client's
    disconnect."""

    def __init__(self, app, metrics: GatewayMetrics, paths: set[str]):
        self.app = app
        self.metrics = metrics
        self.paths = paths  # known routes only, so a scanner cannot blow up label cardinality

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"] if scope["path"] in self.paths else "other"

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(path, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)
