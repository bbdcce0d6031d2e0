"""Load test of `vlp serve` on loopback: latency and throughput with and without batching.

    .venv/bin/python benchmarks/serve_load.py [--requests 300] [--max-seconds 20] [--out PATH]

For each endpoint (image embedding on clip-tiny, greedy captioning on coca-tiny; tiny random-init
models saved to a temporary directory), a real `vlp serve` process is started twice: with
dynamic batching (``--max-batch 32 --max-wait-ms 5``) and without (``--max-batch 1``). Against
each, 1, 8 and 32 concurrent clients (threads, one keep-alive connection each) send the same
image until ``--requests`` requests are answered or ``--max-seconds`` have passed, after a short
warm-up. Recorded per run: p50/p95/p99 latency, requests/s, errors (must be 0; any non-200
answer or failed connection counts), and the server's resident memory before and after the
load. Results go to benchmarks/results/serve_load_<device>.json with the versions and settings,
never a machine path.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import importlib.metadata
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

import vlp
from vlp.tokenizers import train_tokenizer

ENDPOINTS = {  # endpoint -> (preset, request body without the image)
    "/v1/embed/image": ("clip-tiny", {}),
    "/v1/caption": ("coca-tiny", {"max_new_tokens": 10, "num_beams": 1}),
}
CONCURRENCY = (1, 8, 32)
BATCHING = {"batched": ["--max-batch", "32", "--max-wait-ms", "5"],
            "unbatched": ["--max-batch", "1", "--max-wait-ms", "0"]}


def image_b64() -> str:
    image = Image.new("RGB", (320, 240), "white")
    ImageDraw.Draw(image).ellipse((60, 40, 260, 200), fill="red")
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return base64.b64encode(buffer.getvalue()).decode()


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


class Server:
    def __init__(self, model_dir: Path, flags: list[str], threads: int) -> None:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "vlp", "serve", str(model_dir), "--port", str(self.port),
             "--log-level", "warning", *flags], env=env, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"vlp serve exited with {self.process.returncode}")
            try:
                if self.get("/v1/health")[0] == 200:
                    return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("vlp serve did not start")

    def get(self, path: str) -> tuple[int, dict]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            return response.status, json.loads(response.read())
        finally:
            connection.close()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def load(port: int, path: str, body: bytes, clients: int, requests: int,
         max_seconds: float) -> dict:
    """``clients`` threads send ``body`` until ``requests`` answers or ``max_seconds``."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    sent = [0]
    deadline = time.monotonic() + max_seconds

    def client() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        while time.monotonic() < deadline:
            with lock:
                if sent[0] >= requests:
                    break
                sent[0] += 1
            start = time.perf_counter()
            try:
                connection.request("POST", path, body=body,
                                   headers={"Content-Type": "application/json"})
                response = connection.getresponse()
                response.read()
                ok = response.status == 200
                why = f"HTTP {response.status}"
            except (OSError, http.client.HTTPException) as error:
                ok, why = False, type(error).__name__
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            elapsed = time.perf_counter() - start
            with lock:
                (latencies.append(elapsed) if ok else errors.append(why))
        connection.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    ms = [1000 * x for x in latencies]
    return {"clients": clients, "answered": len(latencies), "errors": len(errors),
            "error_kinds": sorted(set(errors)), "seconds": round(wall, 3),
            "requests_per_s": round(len(latencies) / wall, 2),
            "p50_ms": round(percentile(ms, 50), 2) if ms else None,
            "p95_ms": round(percentile(ms, 95), 2) if ms else None,
            "p99_ms": round(percentile(ms, 99), 2) if ms else None,
            "mean_ms": round(statistics.fmean(ms), 2) if ms else None}


def version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=300, help="per run (endpoint, "
                                                                  "batching, clients)")
    parser.add_argument("--max-seconds", type=float, default=20.0, help="per run")
    parser.add_argument("--warmup", type=int, default=16, help="requests before each run")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch threads of the server")
    parser.add_argument("--endpoints", default=",".join(ENDPOINTS))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    out = Path(args.out or Path(__file__).parent / "results" / "serve_load_cpu.json")
    body_image = image_b64()
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        tokenizer = train_tokenizer(["a red circle", "a blue square", "a green star"] * 8,
                                    vocab_size=300, context_length=32)
        for endpoint in args.endpoints.split(","):
            preset, fields = ENDPOINTS[endpoint]
            model_dir = vlp.save(vlp.create_model(preset), Path(tmp) / preset, tokenizer)
            body = json.dumps({"image": body_image, **fields}).encode()
            for mode, flags in BATCHING.items():
                server = Server(model_dir, flags, args.threads)
                try:
                    rss_start = rss_mib(server.process.pid)
                    for clients in CONCURRENCY:
                        load(server.port, endpoint, body, clients, args.warmup, 30)
                        before = server.get("/v1/health")[1]["batching"]
                        result = load(server.port, endpoint, body, clients, args.requests,
                                      args.max_seconds)
                        after = server.get("/v1/health")[1]["batching"]
                        batches = after["batches"] - before["batches"]
                        result["mean_batch"] = round(
                            (after["items"] - before["items"]) / batches, 2) if batches else 0
                        run = {"endpoint": endpoint, "model": preset, "batching": mode,
                               **result}
                        print(json.dumps(run), flush=True)
                        runs.append(run)
                    rss_end = rss_mib(server.process.pid)
                    for run in runs:
                        if run["endpoint"] == endpoint and run["batching"] == mode:
                            run["server_rss_mib_before"] = rss_start
                            run["server_rss_mib_after"] = rss_end
                finally:
                    server.stop()
    result = {
        "benchmark": "vlp serve load test on loopback (tiny random-init models, one image)",
        "device": f"CPU ({platform.processor() or platform.machine()}, "
                  f"{os.cpu_count()} cores, server torch threads {args.threads})",
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "vlp": vlp.__version__, "fastapi": version("fastapi"),
                     "uvicorn": version("uvicorn"), "pillow": version("pillow")},
        "settings": {"requests_per_run": args.requests, "max_seconds_per_run":
                     args.max_seconds, "warmup_requests": args.warmup,
                     "concurrency": list(CONCURRENCY),
                     "batching_flags": {k: " ".join(v) for k, v in BATCHING.items()},
                     "image": "320x240 JPEG, base64 in JSON",
                     "request_fields": {e: ENDPOINTS[e][1] for e in args.endpoints.split(",")},
                     "load_average_at_start": load_at_start,
                     "load_average_at_end": [round(x, 2) for x in os.getloadavg()]},
        "total_errors": sum(run["errors"] for run in runs),
        "runs": runs,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out.name} ({len(runs)} runs, {result['total_errors']} errors)")


if __name__ == "__main__":
    main()
