"""A `vlp serve` process on a free loopback port and a small stdlib HTTP client for it (used by
tests/test_serve.py)."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def multipart(fields: dict[str, Any], files: dict[str, tuple[str, bytes, str]]
              ) -> tuple[bytes, str]:
    """(body, content type) of a multipart/form-data request; a list value is a repeated
    field."""
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in fields.items():
        for item in value if isinstance(value, list) else [value]:
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"'
                         f"\r\n\r\n{item}\r\n".encode())
    for name, (filename, data, kind) in files.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
                     f'filename="{filename}"\r\nContent-Type: {kind}\r\n\r\n'.encode()
                     + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


class Server:
    """``vlp serve MODEL_DIR ARGS`` on a free port, started and waited for until /v1/health
    answers."""

    def __init__(self, model_dir: Path, *args: str, api_key: str | None = None,
                 log: Path | None = None, startup_s: float = 120.0) -> None:
        self.port = free_port()
        self.api_key = api_key
        command = [sys.executable, "-m", "vlp", "serve", str(model_dir), "--port",
                   str(self.port), "--log-level", "warning", *args]
        if api_key:
            command += ["--api-key", api_key]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.log = log
        self.process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                                        stderr=open(log, "wb") if log else subprocess.DEVNULL)
        deadline = time.monotonic() + startup_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"vlp serve exited with {self.process.returncode}: "
                                   f"{log.read_text() if log else ''}")
            try:
                if self.request("GET", "/v1/health")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("vlp serve did not answer /v1/health in time")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.process.poll() is None and self.request("GET", "/v1/health")[0] == 200

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def request(self, method: str, path: str, body: Any = None, *, raw: bytes | None = None,
                content_type: str = "application/json", headers: dict[str, str] | None = None,
                key: str | None = "default", timeout: float = 120.0
                ) -> tuple[int, Any, dict[str, str]]:
        """(status, JSON body or text, headers); ``key`` "default" sends the server's key."""
        sent = dict(headers or {})
        key = self.api_key if key == "default" else key
        if key:
            sent["Authorization"] = f"Bearer {key}"
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None
                                            else None)
        if data is not None:
            sent.setdefault("Content-Type", content_type)
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            connection.request(method, path, body=data, headers=sent)
            response = connection.getresponse()
            text = response.read()
            answer_headers = {k.lower(): v for k, v in response.getheaders()}
        finally:
            connection.close()
        try:
            payload = json.loads(text)
        except ValueError:
            payload = text.decode("utf-8", "replace")
        return response.status, payload, answer_headers

    def post(self, path: str, body: Any = None, **kwargs: Any) -> tuple[int, Any]:
        status, payload, _ = self.request("POST", path, body, **kwargs)
        return status, payload
