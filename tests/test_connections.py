"""Connections cannot hold the server: slow request headers are cut off, connections stay below
the open-file limit, and a burst of one log line is written a bounded number of times."""

from __future__ import annotations

import logging
import resource
import socket
import threading
import time

import httpx
import pytest
import uvicorn

from specsight.remote.auth import KeyRing
from specsight.remote.connections import RepeatFilter, connection_limit
from specsight.remote.jobs import JobStore
from specsight.remote.serve import server_config
from specsight.remote.server import create_app
from tests.conftest import tiny


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def live_server(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    app = create_app(
        {"tiny-llama": tiny("tiny-llama")},
        store=store,
        keys=KeyRing.from_raw_keys({"alice": "k"}),
        start_worker=False,
    )
    port = _free_port()
    config = server_config(
        app, host="127.0.0.1", port=port, log_level="warning", header_timeout_s=0.5
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started
    yield f"http://127.0.0.1:{port}", port
    server.should_exit = True
    thread.join(10)
    store.close()


def test_slow_headers_are_cut_off_and_readyz_keeps_answering(live_server):
    url, port = live_server
    slow = []
    for _ in range(40):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\n")  # the headers never end
        slow.append(sock)
    assert httpx.get(f"{url}/readyz", timeout=5).status_code == 200
    time.sleep(1.0)
    for sock in slow:
        sock.settimeout(3)
        assert sock.recv(1) == b""  # closed by the server
        sock.close()
    # a kept-alive connection that starts a new request too slowly is cut off too
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.settimeout(3)
        answer = b""
        while not answer.endswith(b'{"status":"ok"}'):
            answer += sock.recv(4096)
        assert b"200 OK" in answer
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")
        time.sleep(1.0)
        assert sock.recv(4096) == b""


def test_connections_stay_below_the_open_file_limit():
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = connection_limit()
    assert limit >= 8 and (soft == resource.RLIM_INFINITY or limit <= soft - 64 or limit == 8)


def test_a_burst_of_one_log_line_is_bounded(caplog):
    logger = logging.getLogger("specsight.test.burst")
    limiter = RepeatFilter(burst=5, window_s=60)
    logger.addFilter(limiter)
    try:
        with caplog.at_level(logging.ERROR, logger="specsight.test.burst"):
            for _ in range(10_000):
                logger.error("socket.accept() out of system resource: Too many open files")
            logger.error("another message")
        lines = [r.getMessage() for r in caplog.records]
        assert len(lines) == 6 and lines[-1] == "another message"
    finally:
        logger.removeFilter(limiter)


@pytest.mark.slow
def test_a_low_open_file_limit_keeps_the_server_answering_and_its_log_short(tmp_path):
    """``specsight serve`` under ``ulimit -n 128``, flooded with connections that never finish
    their headers: /readyz keeps answering, the flood is cut off, the log stays short."""
    import subprocess
    import sys

    from specsight.remote.auth import hash_key

    (tmp_path / "keys").write_text(f"a:{hash_key('k')}\n")
    port = _free_port()
    log = tmp_path / "server.log"
    command = [sys.executable, "-c", "from specsight.cli import main; main()", "serve"]
    command += ["--model", "tiny-llama", "--device", "cpu", "--port", str(port)]
    command += ["--db", str(tmp_path / "jobs.sqlite"), "--keys", str(tmp_path / "keys")]
    command += ["--header-timeout", "1"]

    def low_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))

    with open(log, "wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, preexec_fn=low_limit)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        flood = []
        for _ in range(400):
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=1)
                sock.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\n")
                flood.append(sock)
            except OSError:
                break
        answered = httpx.get(f"{url}/readyz", timeout=10).status_code
        assert answered in (200, 503)  # answers, even while flooded
        time.sleep(2.5)  # the flood's headers never came: cut off
        assert httpx.get(f"{url}/readyz", timeout=10).status_code == 200
        for sock in flood:
            sock.close()
    finally:
        proc.terminate()
        proc.wait(30)
    assert log.stat().st_size < 200_000, log.read_text()[-2000:]
