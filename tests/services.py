"""Real services for tests, bound to 127.0.0.1 and stopped by pid by whoever started them."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

PYTHON = sys.executable
CHROMIUM = "/usr/bin/chromium"
# Without the background-networking flags Chromium keeps dialling Google and this closed network refuses it.
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


def stop_process_group(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """Stop a process started with start_new_session=True, and its children, by its pid."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)
    except ProcessLookupError:
        pass


def start_mlflow_server(backend_uri: str, artifacts: Path, port: int, log: Path) -> subprocess.Popen:
    """`mlflow server` on 127.0.0.1:port with --serve-artifacts (as on the cluster head)."""
    cmd = [
        PYTHON, "-m", "mlflow", "server",
        "--host", "127.0.0.1", "--port", str(port),
        "--backend-store-uri", backend_uri,
        "--artifacts-destination", str(artifacts),
        "--serve-artifacts", "--workers", "1",
    ]
    proc = subprocess.Popen(cmd, stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", timeout=90)
    except TimeoutError:
        stop_process_group(proc)
        raise
    return proc


@contextmanager
def mlflow_server(backend_uri: str, workdir: Path):
    """Yield the tracking URI of a fresh MLflow server; stop it (by pid) afterwards."""
    port = free_port()
    proc = start_mlflow_server(backend_uri, workdir / "mlartifacts", port, workdir / "mlflow-server.log")
    try:
        yield f"http://127.0.0.1:{port}", proc
    finally:
        stop_process_group(proc)
