"""Connections cannot hold the server: slow request headers and bodies are cut off, idle
connections are capped per client address and below the open-file limit (health probes and
keyed clients still get in during a flood), and a burst of one log line is written a bounded
number of times."""

from __future__ import annotations

import json
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
from tests.serving import ALICE, BOB, start_server, stop_server, submit


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


# --- on a real `specsight serve` under `ulimit -n 1024` -----------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """``specsight serve`` with the default caps under an open-file limit of 1,024, and a
    body deadline of 6 s (the byte-rate window stays 5 s)."""
    server = start_server(
        tmp_path_factory.mktemp("served"), flags=("--body-timeout", "6"), nofile=1024
    )
    yield server
    stop_server(server)


def _slow_body(served, pace_s: float, chunk: bytes) -> tuple[bytes, float]:
    """POST /v1/jobs with a valid key declaring 100,000 bytes, then ``chunk`` every ``pace_s``
    seconds: what the server answers, and when it closed, counted from the headers."""
    with socket.create_connection(("127.0.0.1", served.port)) as sock:
        sock.sendall(
            b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nX-API-Key: alice-key\r\n"
            b"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n"
        )
        began, answer = time.monotonic(), b""
        sock.settimeout(pace_s)
        while time.monotonic() - began < 40:
            try:
                sock.sendall(chunk)
                data = sock.recv(65536)
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
            if not data:
                break
            answer += data
        return answer, time.monotonic() - began


def test_a_slow_body_from_a_keyed_client_gets_408_at_the_byte_rate_window(served):
    answer, closed_after = _slow_body(served, 8.0, b"{")  # one byte every 8 s
    assert answer.startswith(b"HTTP/1.1 408"), answer
    body = json.loads(answer.partition(b"\r\n\r\n")[2])
    assert body["error"] == "body-timeout" and "bytes/s" in body["message"]
    assert 4.5 <= closed_after < 7.5, closed_after  # the first 5 s window, not 95 s


def test_a_body_that_keeps_coming_is_cut_at_the_total_deadline(served):
    answer, closed_after = _slow_body(served, 0.25, b" " * 1024)  # 4 KB/s: fast enough
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert b"took over 6 s" in answer
    assert 5.5 <= closed_after < 8.5, closed_after
    assert httpx.get(f"{served.url}/v1/models", headers=ALICE).status_code == 200


def _open_idle(count: int, port: int, source: str = "127.0.0.1") -> list[socket.socket]:
    """``count`` connections from ``source`` that never send a byte."""
    socks = []
    for _ in range(count):
        sock = socket.socket()
        sock.bind((source, 0))
        sock.connect(("127.0.0.1", port))
        socks.append(sock)
    return socks


def _closed_by_server(socks: list[socket.socket]) -> int:
    closed = 0
    for sock in socks:
        sock.setblocking(False)
        try:
            closed += sock.recv(1) == b""
        except BlockingIOError:
            pass
        except ConnectionResetError:
            closed += 1
    return closed


def _probe(served) -> list[int]:
    """/healthz, /readyz, another key's submit, and a keyed GET, each on a new connection."""
    spec = {"specsight": 1, "model": "tiny-llama", "invokes": {"a": {"prompt": "Hi there"}}}
    return [
        httpx.get(f"{served.url}/healthz", timeout=10).status_code,
        httpx.get(f"{served.url}/readyz", timeout=10).status_code,
        submit(served.url, spec, BOB, timeout=30).status_code,
        httpx.get(f"{served.url}/v1/models", headers=ALICE, timeout=10).status_code,
    ]


def _room_for(sockets: int) -> None:
    """This (client) process's open-file limit raised to hold ``sockets`` (or a skip)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < sockets + 100:
        if hard != resource.RLIM_INFINITY and hard < sockets + 100:
            pytest.skip(f"the client needs {sockets + 100} open files; its hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (sockets + 100, hard))


def test_a_flood_of_idle_unkeyed_connections_leaves_health_and_submits_answering(served):
    _room_for(2200)
    limits = httpx.get(f"{served.url}/v1/limits", headers=ALICE).json()["connections"]
    cap, per_address = limits["max_connections"], limits["max_connections_per_address"]
    assert cap == 1024 - 64
    flood = _open_idle(1000, served.port)  # from one address, as an attacker on one machine
    try:
        assert _probe(served) == [200, 200, 202, 200]
        time.sleep(0.5)
        # the server kept the address's newest ones (less those the probes took), closed the rest
        closed = _closed_by_server(flood)
        assert 1000 - per_address <= closed <= 1000 - per_address + 4, closed
        # from 20 more addresses (127.0.0.2-21, 60 each: under the per-address cap) past the
        # server's cap: the longest idle ones close (the first flood's first), nothing is 503
        spread = [s for i in range(2, 22) for s in _open_idle(60, served.port, f"127.0.0.{i}")]
        assert _probe(served) == [200, 200, 202, 200]
        time.sleep(0.5)
        assert _closed_by_server(flood) == 1000
        assert 1200 - cap <= _closed_by_server(spread) <= 1200 - cap + 4 + per_address
        flood += spread
    finally:
        for sock in flood:
            sock.close()
    assert b"Exceeded concurrency limit" not in served.log.read_bytes()


def test_keyed_connections_are_not_closed_for_unkeyed_ones(served):
    keyed = []
    for _ in range(70):  # more than the per-address cap, each kept open after a keyed request
        sock = socket.create_connection(("127.0.0.1", served.port))
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-API-Key: bob-key\r\n\r\n")
        sock.settimeout(5)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        keyed.append(sock)
    flood = _open_idle(200, served.port)
    try:
        time.sleep(0.3)
        assert _closed_by_server(keyed) == 0  # kept alive: their keep-alive is 5 s
        assert _closed_by_server(flood) >= 200 - 64
    finally:
        for sock in keyed + flood:
            sock.close()
