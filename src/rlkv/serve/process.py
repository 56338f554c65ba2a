"""`rlkv serve` as a child process on a free local port: what the serving benchmark and the tests start.

server = ServerProcess(["--model", "DIR", "--kv-budget", "4GiB"], "serve.log")
server.wait_ready(120)       # polls /health; raises with the log's tail if it exits or never answers
server.metrics()             # /metrics as {series: value}
server.close()               # SIGTERM, then SIGKILL after `grace` seconds
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

_SERIES = re.compile(r"^(rlkv_[a-z_]+(?:\{[^}]*\})?) (\S+)$", re.M)


def read_metrics(url: str, api_key: str | None = None) -> dict[str, float]:
    """Every rlkv series of a server's /metrics (labelled ones with their labels) and its value."""
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    answer = httpx.get(f"{url}/metrics", timeout=10, headers=headers)
    answer.raise_for_status()
    return {m[1]: float(m[2]) for m in _SERIES.finditer(answer.text)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m rlkv serve *args` on 127.0.0.1 and a free port, its output in `log`; `api_key`: the key it
    was given (with --api-key or RLKV_API_KEY), for `metrics()`."""

    def __init__(
        self, args: list[str], log: str | os.PathLike, env: dict[str, str] | None = None, api_key: str | None = None
    ):
        self.api_key = api_key
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [sys.executable, "-m", "rlkv", "serve", *args, "--host", "127.0.0.1", "--port", str(self.port)]
        src = str(Path(__file__).resolve().parents[2])  # the rlkv being run, whether installed or not
        path = os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))
        self.log_path = Path(log)
        self.log = self.log_path.open("w+")
        self.proc = subprocess.Popen(
            self.command,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": path, **(env or {})},
        )

    def wait_ready(self, timeout: float) -> None:
        """Return once /health answers 200; raise if the process exits first or `timeout` seconds pass."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.close()
        raise TimeoutError(f"the server did not answer /health within {timeout:g} s:\n{self.output()}")

    def metrics(self) -> dict[str, float]:
        return read_metrics(self.url, self.api_key)

    def output(self, chars: int = 4000) -> str:
        """The end of what the server printed."""
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text(errors="replace")[-chars:]

    def close(self, grace: float = 30) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()
