"""The `fedsea` command."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from audit import cli as audit_cli
from fedsea_shared import defaults
# Each flag's choices come from the code that implements them (one home per concept).
from fedsea_shared.layers.linear import LINEAR_KERNELS, WEIGHT_FORMATS
from fedsea_shared.protocol import WIRE_DTYPES
from fedsea_shared.shard import BLOCK_OPS
from edge_runtime.settings import EdgeSettings
from gateway.backend import GatewaySettings
from server_runtime.app import ServerSettings
from server_runtime.attention_backends import BACKENDS
from server_runtime.engine import EngineSettings
from server_runtime.kv_pool import parse_memory
from server_runtime.training_service import TrainingSettings

# Every default below is read from the settings classes (one home per default); only the
# flags' wording lives here.


KV_DTYPE_HELP = ("what the server's KV pool stores K/V in; auto = bfloat16 where the middle blocks' weights are "
                 "bfloat16/int8/int4 (their products already round to bf16) and the torch backend's gather "
                 "decode reads it, float16 for float16 weights, else the compute dtype: a bfloat16 pool holds "
                 "twice the tokens per byte (default: %(default)s)")


def _bytes(text: str) -> int:
    """A size flag: bytes, or with a unit (512MiB, 2GiB)."""
    return parse_memory(text)


def _size(n: int) -> str:
    return f"{n / 2**30:g}GiB" if n % 2**30 == 0 else f"{n / 2**20:g}MiB"


def _split_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=defaults.MODEL, help="checkpoint directory or packaged model name (default: %(default)s)")
    p.add_argument("--head", type=int, default=defaults.HEAD, help="blocks before the server's range, kept on the edge (default: %(default)s)")
    p.add_argument("--tail", type=int, default=defaults.TAIL, help="blocks after the server's range, kept on the edge (default: %(default)s)")
    p.add_argument("--adapter", action="append", default=[], metavar="[NAME=]DIR",
                   help="also serve this fine-tuned LoRA adapter (a fedsea-finetune adapter/ directory) as model NAME "
                        "(default: the directory's name); repeatable. Edge and server need the same adapters")
    p.add_argument("--linear-kernel", default="auto", choices=LINEAR_KERNELS,
                   help="matmuls of this side's blocks: onednn (oneDNN, weights packed in its layout; CPU), mixed "
                        "(those plus dense copies for one- or two-row products, on MKL: twice the weights' memory) or "
                        "torch's (MKL on CPU); auto = mixed where a startup measurement finds MKL clearly faster at "
                        "one row, else onednn where it runs, else torch")
    p.add_argument("--weights", default=defaults.weights(), choices=WEIGHT_FORMATS,
                   help="how this side stores its linear layers' weights: dense float32/bfloat16/float16, int8 with a "
                        "scale per output channel, or int4 in groups of 32 (the embedding int8 per row); auto = a "
                        "GGUF file's own formats, a bfloat16/float16 checkpoint's own dtype, else int4 on a CPU that "
                        "multiplies bf16 natively (AVX512-BF16/AMX: the fastest here, +0.2-0.4%% perplexity on the "
                        "default model) and float32 elsewhere (default: $FEDSEA_WEIGHTS, else auto)")
    p.add_argument("--block-ops", default="auto", choices=BLOCK_OPS,
                   help="a block's norms, rotary, SiLU-and-mul and short decode attention: native (fused C kernels "
                        "built with the machine's compiler on first use; float32 CPU), vllm (vLLM's RMSNorm) or "
                        "torch's ops; auto = native where it builds, else vllm with the vllm attention backend, else torch")


def _adapters(args) -> dict[str, str]:
    from fedsea_shared.adapters import parse_adapter_args

    return {name: str(path) for name, path in parse_adapter_args(args.adapter, Path(args.model).name).items()}


def _server_parser(sub) -> None:
    p = sub.add_parser("server", help="run the server runtime (middle blocks) for remote edges")
    _split_args(p)
    s = ServerSettings
    p.add_argument("--host", default=s.host)
    p.add_argument("--port", type=int, default=s.port)
    p.add_argument("--device", default=s.device)
    p.add_argument("--dtype", default=s.dtype, choices=list(WIRE_DTYPES))
    p.add_argument("--kv-cache-memory", default=defaults.kv_cache_memory(),
                   help="KV pool size: bytes (2GiB, 512MiB) or a fraction of free GPU memory (0.8) (default: "
                        "$FEDSEA_KV_CACHE_MEMORY, else 1GiB)")
    p.add_argument("--kv-dtype", default=s.kv_dtype, choices=["auto", *WIRE_DTYPES], help=KV_DTYPE_HELP)
    p.add_argument("--block-size", type=int, default=s.block_size, help="tokens per KV block")
    _attention_backend_arg(p)
    p.add_argument("--decode-attention", default=s.decode_attention, choices=["auto", "gather", "flex"],
                   help="decode attention over the KV pool: flex reads blocks in place (compiled per batch size), "
                        "gather copies each context out first; auto = flex on CUDA, gather on CPU")
    p.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                   help="run decode ticks eagerly instead of replaying captured CUDA graphs")
    p.add_argument("--max-graph-batch", type=int, default=s.max_graph_batch, help="largest decode batch replayed as a CUDA graph")
    _max_context_arg(p)
    e = EngineSettings
    p.add_argument("--token-budget", type=int, default=e.token_budget, help="tokens per batched forward (chunked prefill)")
    p.add_argument("--noise-min", type=float, default=s.noise_min, help="lowest noise scale an edge may declare")
    p.add_argument("--noise-max", type=float, default=s.noise_max, help="highest noise scale an edge may declare")
    p.add_argument("--max-sessions-per-connection", type=int, default=s.max_sessions_per_connection)
    p.add_argument("--idle-timeout", type=float, default=e.idle_timeout, help="seconds before an idle session's cache is freed")
    p.add_argument("--wait-timeout", type=float, default=e.wait_timeout, help="seconds a request may wait for KV capacity")
    p.add_argument("--max-sessions-per-key", type=int, default=s.max_sessions_per_key)
    p.add_argument("--tensor-parallel", type=int, default=s.tensor_parallel, metavar="N",
                   help="split the middle blocks' heads and MLP over N ranks (processes spawned on this host, or the "
                        "processes torchrun started; gloo on the CPU, NCCL on CUDA); plans and hidden states travel "
                        "between ranks in clear text: one host or a private network only (default: %(default)s)")
    p.add_argument("--tensor-parallel-timeout", type=float, default=s.tensor_parallel_timeout, metavar="SECONDS",
                   help="a rank that does not answer a collective within this time makes the server unhealthy "
                        "(default: %(default)s)")
    _server_security_args(p)


def _attention_backend_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--attention-backend", default="auto", choices=["auto", *BACKENDS],
                   help="attention kernels of the server runtime: torch (SDPA prefill + --decode-attention) or vllm "
                        "(vLLM's paged attention, one varlen call per layer; needs vllm installed, head_dim >= 32 "
                        "and --block-size a multiple of 16); auto = vllm where installed and it fits, else torch")


def _server_security_args(p: argparse.ArgumentParser) -> None:
    """Exposure, tenants and their limits (a tenant: an API key; without keys, a connection)."""
    g, s, t = p.add_argument_group("security and limits"), ServerSettings, TrainingSettings
    g.add_argument("--ssl-certfile", metavar="FILE", help="TLS certificate chain (PEM): serve wss:// (and /health, /metrics over https)")
    g.add_argument("--ssl-keyfile", metavar="FILE", help="private key of --ssl-certfile (PEM)")
    g.add_argument("--api-key-file", metavar="FILE", help="accept edges presenting any key in this file (one per line); "
                                                          "also $FEDSEA_SERVER_API_KEYS (comma-separated)")
    g.add_argument("--api-key", action="append", default=[],
                   help="accept edges presenting this key (repeatable; visible in `ps`: prefer --api-key-file); "
                        "without keys any edge may connect")
    g.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback --host without TLS and an API key (a network you trust)")
    g.add_argument("--protect-metrics", action="store_true", help="require the API key on /metrics and /health too")
    g.add_argument("--max-connections", type=int, default=s.max_connections, help="connections in all (default: %(default)s)")
    g.add_argument("--max-connections-per-key", type=int, default=s.max_connections_per_key,
                   help="connections per API key, or per client address without keys (default: %(default)s)")
    g.add_argument("--max-queued-bytes", type=_bytes, default=s.max_queued_bytes,
                   help=f"input of one connection waiting for replies (default: {_size(s.max_queued_bytes)})")
    g.add_argument("--kv-quota", type=float, default=s.kv_quota,
                   help="share of the KV pool one API key (without keys: one connection) may hold; past it, its steps "
                        "wait (default: %(default)s)")
    g.add_argument("--enable-training", action="store_true", help="serve split fine-tuning (train_*) requests")
    g.add_argument("--training-memory", type=_bytes, default=t.memory,
                   help=f"memory for training adapters, optimizer and autograd state, all jobs (default: {_size(t.memory)})")
    g.add_argument("--training-step-timeout", type=float, default=t.step_timeout,
                   help="seconds a training forward's state waits for its backward (default: %(default)s)")


def _server_keys(args) -> tuple[str, ...]:
    keys = list(args.api_key) + [k for k in os.environ.get("FEDSEA_SERVER_API_KEYS", "").split(",") if k]
    if args.api_key_file:
        with open(args.api_key_file) as f:
            keys += [line.strip() for line in f if line.strip() and not line.startswith("#")]
    return tuple(keys)


def _server_security(args) -> dict:
    return dict(
        ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile, api_keys=_server_keys(args),
        insecure=args.insecure, protect_metrics=args.protect_metrics, max_connections=args.max_connections,
        max_connections_per_key=args.max_connections_per_key, max_queued_bytes=args.max_queued_bytes,
        kv_quota=args.kv_quota, enable_training=args.enable_training,
        training=TrainingSettings(memory=args.training_memory, step_timeout=args.training_step_timeout),
    )


def _edge_args(p: argparse.ArgumentParser) -> None:
    """The edge and OpenAI API side, shared by `serve` and `gateway`."""
    p.add_argument("--noise", type=float, default=EdgeSettings.noise, help="noise added to hidden states before they leave this machine, relative to their RMS (default: %(default)s)")
    p.add_argument("--host", default=GatewaySettings.host, help="address of the OpenAI-compatible API (default: %(default)s)")
    p.add_argument("--port", type=int, default=GatewaySettings.port, help="port of the OpenAI-compatible API (default: %(default)s)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 (visible to other users in ps: "
                                     "prefer --api-key-file or $FEDSEA_API_KEY; default: no key)")
    p.add_argument("--api-key-file", metavar="FILE", help="read the --api-key from FILE")
    p.add_argument("--protect-status", action="store_true", help="require the API key for /health, /metrics and /openapi.json too")
    p.add_argument("--no-pseudonymize", dest="pseudonymize", action="store_false",
                   help="send names, addresses, phone and card numbers, e-mails, digit runs (...) as typed instead of "
                        "keyed surrogates that the edge maps back in the output (default: pseudonymize; see "
                        "docs/privacy.md and `fedsea preview`)")
    p.add_argument("--edge-cache-memory", type=_bytes, default=EdgeSettings.edge_cache_memory,
                   help="memory for recent conversations' edge state, so a chat's next turn computes and sends only "
                        f"its new tokens (bytes, e.g. 512MiB; 0 turns prefix reuse off; default: {_size(EdgeSettings.edge_cache_memory)})")
    p.add_argument("--no-lm-head-copy", dest="lm_head_copy", action="store_false",
                   help="run the LM head tied to the embedding on the embedding's own weight instead of a copy "
                        "packed for oneDNN (saves the embedding's size in memory, 113 MB for SmolLM2-135M; the LM "
                        "head of a batch of 8-16 generations takes about twice as long)")


def _max_context_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-context", type=int, default=EngineSettings.max_context,
                   help="most tokens (prompt and generated) a session may hold; a model with a sliding "
                        "attention window is served only up to its window")


def _serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="the embedded default: server runtime + edge + OpenAI API in one process (an in-process link, no socket between them)")
    _split_args(p)
    _edge_args(p)
    p.add_argument("--server-weights", choices=WEIGHT_FORMATS,
                   help="weight format of the server runtime's middle blocks (default: --weights)")
    p.add_argument("--edge-weights", choices=WEIGHT_FORMATS,
                   help="weight format of the edge's blocks, embedding and LM head (default: --weights)")
    p.add_argument("--device", default=ServerSettings.device, help="device of the server runtime's middle blocks")
    p.add_argument("--kv-cache-memory", default=defaults.kv_cache_memory(),
                   help="KV pool size of the server runtime (default: $FEDSEA_KV_CACHE_MEMORY, else 1GiB)")
    p.add_argument("--kv-dtype", default=ServerSettings.kv_dtype, choices=["auto", *WIRE_DTYPES], help=KV_DTYPE_HELP)
    _max_context_arg(p)
    _attention_backend_arg(p)
    p.add_argument("--threads", type=int, metavar="N",
                   help="torch intra-op threads of the one thread that runs both sides' forward passes "
                        "(default: $FEDSEA_THREADS, else the cores, or $OMP_NUM_THREADS)")


def _gateway_parser(sub) -> None:
    p = sub.add_parser("gateway", help="edge + OpenAI API against a remote server runtime (`fedsea server`)")
    _split_args(p)
    _edge_args(p)
    p.add_argument("--server", action="append", metavar="URL",
                   help="websocket URL of a server runtime; repeat for replicas of the same model and cut: sessions go "
                        "to the least loaded, a conversation's turns to the server of its first, and a session whose "
                        f"server dies goes on on another (default: {EdgeSettings.server_url})")
    g = p.add_argument_group("TLS")
    g.add_argument("--server-ca", metavar="FILE", help="PEM file verifying a wss:// --server: a private CA or the server's "
                                                       "self-signed certificate (default: the system trust store)")
    g.add_argument("--ssl-certfile", metavar="FILE", help="serve the OpenAI API over https with this certificate chain (PEM)")
    g.add_argument("--ssl-keyfile", metavar="FILE", help="private key of --ssl-certfile (PEM)")
    p.add_argument("--server-api-key", help="key this edge presents to the server runtime (visible in ps: prefer "
                                            "--server-api-key-file or $FEDSEA_SERVER_API_KEY; default: none)")
    p.add_argument("--server-api-key-file", metavar="FILE", help="read the --server-api-key from FILE")


def _preview_parser(sub) -> None:
    p = sub.add_parser("preview", help="print what a chat request would send: the templated text with the "
                                       "pseudonymizer's surrogates in place, and each hidden span (nothing is sent)")
    p.add_argument("--model", default=defaults.MODEL, help="checkpoint directory or packaged model name (its tokenizer "
                                                           "and chat template; default: %(default)s)")
    p.add_argument("request", nargs="?", default="-", help="an OpenAI chat-completions body (JSON file, - for stdin), "
                                                            "or with --text the user's message itself")
    p.add_argument("--text", action="store_true", help="REQUEST is one user message's text, not a JSON body")
    p.add_argument("--no-pseudonymize", dest="pseudonymize", action="store_false", help="as the gateway's flag")
    p.add_argument("--json", action="store_true", help="print the preview as JSON (as POST /fedsea/v1/preview returns it)")


def _run_preview(args) -> None:
    import json

    from transformers import AutoTokenizer

    from edge_runtime.keys import load_or_create_key
    from edge_runtime.pseudonyms import Pseudonymizer
    from fedsea_shared.models import resolve_model
    from gateway.preview import preview, template_input
    from gateway.schemas import ChatCompletionRequest

    raw = sys.stdin.read() if args.request == "-" else args.request if args.text else Path(args.request).read_text()
    body = {"messages": [{"role": "user", "content": raw}]} if args.text else json.loads(raw)
    req = ChatCompletionRequest.model_validate({"model": "preview", **body})
    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model(args.model)), local_files_only=True)
    # This device's key, as the gateway uses it: the surrogates shown are the ones sent.
    pseudonymizer = Pseudonymizer(load_or_create_key()) if args.pseudonymize else None
    shown = preview(tokenizer, pseudonymizer, *template_input(req, tokenizer))
    if args.json:
        print(shown.model_dump_json(indent=1))
        return
    print(shown.sent_text)
    for span in shown.spans:
        print(f"  {span.kind:<9} {span.text!r} -> {span.surrogate!r}")


def _secret(args, name: str, env: str) -> str | None:
    """A key from --NAME, --NAME-file or $ENV (in that order of precedence)."""
    flag, path = getattr(args, name), getattr(args, f"{name}_file")
    option = "--" + name.replace("_", "-")
    if flag is not None and path is not None:
        raise ValueError(f"give {option} or {option}-file, not both")
    if flag is not None:
        logging.getLogger("fedsea").warning("%s on the command line is visible to every user of this machine (ps); "
                                            "use %s-file or $%s", option, option, env)
        return flag
    if path is not None:
        key = Path(path).read_text().strip()  # FileNotFoundError names the file
        if not key:
            raise ValueError(f"{option}-file {path} is empty")
        return key
    return os.environ.get(env) or None


def gateway_settings(args, server_url: str | list[str], server_api_key: str | None = None) -> GatewaySettings:
    """`fedsea gateway`/`serve`'s settings from its flags."""
    api_key = _secret(args, "api_key", "FEDSEA_API_KEY")
    if args.protect_status and api_key is None:
        raise ValueError("--protect-status needs an API key (--api-key-file or $FEDSEA_API_KEY)")
    edge = EdgeSettings(
        server_url=server_url, server_api_key=server_api_key, model=args.model, head=args.head, tail=args.tail,
        noise=args.noise, pseudonymize=args.pseudonymize, adapters=_adapters(args), edge_cache_memory=args.edge_cache_memory,
        server_ca=getattr(args, "server_ca", None), linear_kernel=args.linear_kernel, block_ops=args.block_ops,
        lm_head_copy=args.lm_head_copy, weights=getattr(args, "edge_weights", None) or args.weights,
    )
    return GatewaySettings(edge=edge, host=args.host, port=args.port, api_key=api_key, protect_status=args.protect_status,
                           ssl_certfile=getattr(args, "ssl_certfile", None), ssl_keyfile=getattr(args, "ssl_keyfile", None))


def server_settings(args) -> ServerSettings:
    """`fedsea server`'s settings from its flags."""
    return ServerSettings(
        model=args.model, head=args.head, tail=args.tail, host=args.host, port=args.port,
        device=args.device, dtype=args.dtype, kv_cache_memory=args.kv_cache_memory, kv_dtype=args.kv_dtype,
        block_size=args.block_size, attention_backend=args.attention_backend, linear_kernel=args.linear_kernel,
        weights=args.weights, block_ops=args.block_ops, decode_attention=args.decode_attention, cuda_graphs=args.cuda_graphs,
        max_graph_batch=args.max_graph_batch, noise_min=args.noise_min, noise_max=args.noise_max,
        max_sessions_per_connection=args.max_sessions_per_connection,
        max_sessions_per_key=args.max_sessions_per_key, adapters=_adapters(args), **_server_security(args),
        tensor_parallel=args.tensor_parallel, tensor_parallel_timeout=args.tensor_parallel_timeout,
        engine=EngineSettings(
            max_context=args.max_context, token_budget=args.token_budget,
            wait_timeout=args.wait_timeout, idle_timeout=args.idle_timeout,
        ),
    )


def _run_serve(args) -> None:
    from fedsea_shared import threads
    from fedsea_shared.models import resolve_model
    from gateway import run_gateway
    from server_runtime.app import ServerRuntime

    n, source = threads.compute_threads(args.threads)
    threads.apply(n)
    # One OpenMP team for the process (fedsea_shared.threads): this thread (the gateway's
    # event loop) is serial before it runs any op, and the edge's and the server's forward
    # passes take turns on one compute thread with all the cores.
    threads.serial()
    compute = threads.ComputeThread()
    resolve_model(args.model)  # prepares the default model once; safe when two processes start together
    logging.getLogger("fedsea").info("torch intra-op threads: %d on the compute thread of both sides (%s)", n, source)
    server = ServerRuntime(ServerSettings(
        model=args.model, head=args.head, tail=args.tail, device=args.device, kv_cache_memory=args.kv_cache_memory,
        kv_dtype=args.kv_dtype,
        adapters=_adapters(args), attention_backend=args.attention_backend, linear_kernel=args.linear_kernel,
        block_ops=args.block_ops, weights=args.server_weights or args.weights,
        kv_quota=1.0,  # its only tenant is this process's own gateway
        engine=EngineSettings(max_context=args.max_context),
    ), compute.run)
    try:
        settings = gateway_settings(args, server.listen_in_process())
        settings.edge.compute, settings.server_metrics = compute.run, server.metrics.render
        run_gateway(settings, log_level=args.log_level.lower())
    finally:
        server.close()
        compute.close()


def _run_gateway(args) -> None:
    from fedsea_shared.models import resolve_model
    from fedsea_shared.threads import serial
    from gateway import run_gateway

    serial()  # before any op here: the event loop stays out of OpenMP (fedsea_shared.threads)

    servers = args.server or [EdgeSettings.server_url]
    for url in servers:
        if not url.startswith(("ws://", "wss://")):
            raise ValueError(f"--server must be a ws:// or wss:// URL, got {url!r}")
    resolve_model(args.model)
    settings = gateway_settings(args, servers, _secret(args, "server_api_key", "FEDSEA_SERVER_API_KEY"))
    run_gateway(settings, log_level=args.log_level.lower())


def _run_server(args) -> None:
    from server_runtime.app import run_server
    from server_runtime.executor import serve_rank, torchrun_rank

    settings = server_settings(args)
    rank = torchrun_rank(settings.tensor_parallel)
    if rank:  # torchrun's other ranks serve rank 0's ticks, not edges
        return serve_rank(settings, rank, settings.tensor_parallel)
    asyncio.run(run_server(settings))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fedsea", description=__doc__)
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)
    _server_parser(sub)
    _serve_parser(sub)
    _gateway_parser(sub)
    _preview_parser(sub)
    audit_cli.add_parser(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        {"server": _run_server, "serve": _run_serve, "gateway": _run_gateway, "preview": _run_preview,
         "audit": audit_cli.run}[args.command](args)
    except KeyboardInterrupt:
        pass
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"fedsea {args.command}: {e}")


if __name__ == "__main__":
    main()
