"""What the benchmarks share: one measured side in its own process, and the facts a result
records about the machine it ran on.

A side runs ``target(conn, **kwargs)`` in a ``spawn``-ed process and answers requests over a
pipe; an error inside it is sent back as ``{"error", "traceback_tail"}`` (`send_error`) and
raised in the parent as `WorkerError`, so one failing side becomes one line of the results
instead of a crash. Each side owning its process keeps its resident-memory high-water mark its
own (`rss_kb`, `reset_peak_rss`).
"""

from __future__ import annotations

import json
import os
import platform
import re
import traceback
from pathlib import Path

import torch


def error_message(error: BaseException) -> str:
    """``Type: message`` with the machine's paths cut out (results record no paths)."""
    return re.sub(r"\s*\(/[^)]*\)", "", f"{type(error).__name__}: {error}")


def send_error(conn, error: BaseException) -> None:
    """Inside a side: report ``error`` to the parent instead of dying with it."""
    conn.send({"error": error_message(error)[:2000],
               "traceback_tail": "".join(traceback.format_exception(error))[-3000:]})


def serve(conn, start) -> None:
    """A side's whole life: ``start()`` builds what the side measures and returns
    ``(greeting, handle)``; the greeting goes to the parent, then every request is answered
    with ``handle(request)`` until ("quit",) (or a request ``handle`` answers with None). An
    error anywhere goes back to the parent (`send_error`) instead of killing the side silently."""
    try:
        greeting, handle = start()
        conn.send(greeting)
        while True:
            request = conn.recv()
            answer = None if request[0] == "quit" else handle(request)
            if answer is None:
                break
            conn.send(answer)
    except BaseException as error:  # the parent records it instead of crashing
        send_error(conn, error)
    finally:
        conn.close()


def write_result(report: dict, out: str | None, default_name: str) -> Path:
    """``report`` as indented JSON at ``out`` (default: ``benchmarks/results/<default_name>``)."""
    path = Path(out or Path(__file__).parent / "results" / default_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


class WorkerError(RuntimeError):
    def __init__(self, name: str, answer: dict) -> None:
        super().__init__(f"{name}: {answer['error']}")
        self.answer = answer


class WorkerProcess:
    """One side: ``target(conn, **kwargs)`` in a fresh process of ``context``."""

    def __init__(self, context, name: str, target, **kwargs) -> None:
        self.name = name
        self.conn, child = context.Pipe()
        self.process = context.Process(target=target, args=(child,), kwargs=kwargs, daemon=True)
        self.process.start()
        child.close()

    def ask(self, request: tuple | None, timeout: float) -> dict:
        """Send ``request`` (None: only wait for the next answer) and return the answer."""
        if request:
            self.conn.send(request)
        return self.answer(request, timeout)

    def answer(self, request: tuple | None, timeout: float) -> dict:
        if not self.conn.poll(timeout):
            what = f" to {request[:1]}" if request else ""
            raise TimeoutError(f"{self.name}: no answer{what} in {timeout:.0f} s")
        answer = self.conn.recv()
        if "error" in answer:
            raise WorkerError(self.name, answer)
        return answer

    def stop(self) -> None:
        """Ask the side to quit; kill it if it has not within 30 s."""
        try:
            self.conn.send(("quit",))
        except (BrokenPipeError, OSError):
            pass
        self.process.join(timeout=30)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


def rss_kb(field: str) -> int:
    """``VmRSS`` (resident now) or ``VmHWM`` (high-water mark) of this process, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> bool:
    """Set this process's VmHWM to its VmRSS (Linux >= 4.0); False where that is refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def load_average() -> list[float] | None:
    """Other work on the machine, recorded beside the numbers it may have disturbed."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def device_name(device: torch.device, threads: int) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU ({model}, {os.cpu_count()} cores, {threads} thread(s))"


def versions() -> dict:
    """Installed versions, read from package metadata (importing transformers takes long)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {"torch": torch.__version__}
    for name in ("transformers", "open_clip_torch", "pillow", "torchvision"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found
