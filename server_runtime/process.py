"""Start `fedsea server` as a separate process and wait until it is healthy: how the
exactness tests and the benchmarks put edge and server in different processes."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server_process(
    model: Path | str, head: int, tail: int, *extra: str, log_path: Path | None = None, timeout: float = 180
) -> Iterator[str]:
    """Yields the server's ws:// URL once its /health answers; terminates it on exit."""
    port = free_port()
    cmd = [sys.executable, "-m", "fedsea.cli", "server", "--model", str(model),
           "--head", str(head), "--tail", str(tail), "--port", str(port), *extra]
    log = open(log_path, "w") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while not _healthy(port):
            if proc.poll() is not None:
                raise RuntimeError(f"fedsea server exited with {proc.returncode} (log: {log_path})")
            if time.monotonic() > deadline:
                raise TimeoutError("fedsea server did not become healthy")
            time.sleep(0.2)
        yield f"ws://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        if log_path:
            log.close()


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
            return r.status == 200
    except OSError:
        return False
