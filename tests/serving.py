"""A real ``specsight serve`` process on loopback for the server tests: started with a keys
file (and optionally a ``--deploy`` file and an open-file limit), waited for until ``/readyz``
answers, stopped with SIGTERM; plus raw-socket helpers for what httpx will not send."""

from __future__ import annotations

import json
import resource
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from specsight.remote.auth import hash_key

KEYS = {"alice": "alice-key", "bob": "bob-key"}
ALICE, BOB = {"X-API-Key": "alice-key"}, {"X-API-Key": "bob-key"}
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Served:
    url: str
    port: int
    proc: subprocess.Popen
    log: Path

    def rss_mb(self) -> dict[str, float]:
        """The server's resident memory now (VmRSS) and its peak (VmHWM), in MB."""
        fields = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                fields[name] = int(value.split()[0]) / 1024
        return fields

    def reset_peak(self) -> None:
        """Make VmHWM start again from the current RSS (Linux: clear_refs 5)."""
        Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:]


def start_server(
    folder: Path,
    *,
    deploy: dict[str, Any] | None = None,
    flags: tuple[str, ...] = (),
    nofile: int | None = None,
    model: str = "tiny-llama",
    timeout: float = 180.0,
) -> Served:
    """``specsight serve`` of ``model`` on CPU with :data:`KEYS`; ``deploy``: the fields of a
    ``--deploy`` file over the defaults; ``nofile``: the process's open-file limit."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "keys").write_text("".join(f"{n}:{hash_key(k)}\n" for n, k in KEYS.items()))
    port = free_port()
    command = [sys.executable, "-c", "from specsight.cli import main; main()", "serve"]
    command += ["--keys", str(folder / "keys"), "--port", str(port), *flags]
    if deploy is None:
        command += ["--model", model, "--device", "cpu", "--db", str(folder / "jobs.sqlite")]
    else:
        config = {"db": str(folder / "jobs.sqlite"), "models": [{"id": model, "device": "cpu"}]}
        (folder / "serve.json").write_text(json.dumps({**config, **deploy}))
        command += ["--deploy", str(folder / "serve.json")]

    def limit_files() -> None:
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    log = folder / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, preexec_fn=limit_files
        )
    served = Served(f"http://127.0.0.1:{port}", port, proc, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited:\n{served.tail()}")
        try:
            if httpx.get(f"{served.url}/readyz", timeout=2).status_code == 200:
                return served
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    stop_server(served)
    raise RuntimeError(f"the server was not ready in {timeout} s:\n{served.tail()}")


def stop_server(served: Served) -> None:
    if served.proc.poll() is None:
        served.proc.send_signal(signal.SIGTERM)
        try:
            served.proc.wait(30)
        except subprocess.TimeoutExpired:
            served.proc.kill()
            served.proc.wait(10)


def submit(url: str, spec: dict[str, Any], headers: dict[str, str], **kwargs: Any) -> Any:
    body = json.dumps({"spec": spec, "client_version": "t"})
    return httpx.post(
        f"{url}/v1/jobs",
        content=body,
        headers={**headers, "content-type": "application/json"},
        timeout=kwargs.pop("timeout", 120),
        **kwargs,
    )


def read_answer(sock: socket.socket, timeout: float) -> bytes:
    """Everything the server sends until it closes the connection (or ``timeout`` passes)."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return data
