"""Start a recps server module as a child process and wait for its ready line.

Every recps server entry point (``recps.ps.main``, ``recps.serving.main``,
``recps.serving.ranking_server``) prints one JSON ``{"event": "ready", ...}`` line on stdout
when it serves, with its address and ports; :func:`start_service` waits for it. Used by
``recps demo serve`` and the benchmarks; tests use their own harness, which also ties the
child's life to the test process.

Example:
    >>> proc, ready = start_service(  # doctest: +SKIP
    ...     "recps.serving.main", ["--model", "/models", "--data-dir", "/tmp/r0"], "r0.log")
    >>> ready["address"]  # doctest: +SKIP
    '127.0.0.1:40123'
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from recps.embedding.errors import RecpsError


class ServiceStartError(RecpsError):
    """A server process exited, or printed no ready line, before serving."""

    status = "UNAVAILABLE"


def start_service(
    module: str, args: list[str], log_path: str | Path
) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    """``python -m module *args`` with stderr to ``log_path``; ``(process, ready event)``."""
    log_path = Path(log_path)
    with open(log_path, "w") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            stdout=subprocess.PIPE,
            stderr=log,
            stdin=subprocess.DEVNULL,
            text=True,
        )
    assert proc.stdout is not None
    for line in proc.stdout:
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if not isinstance(event, dict):
            continue
        if event.get("event") == "ready":
            # Keep reading: a child blocked on a full stdout pipe would stall.
            threading.Thread(target=_drain, args=(proc.stdout,), daemon=True).start()
            return proc, event
        if event.get("event") == "failed":
            break
    proc.kill()
    proc.wait(timeout=30)
    raise ServiceStartError(f"{module} did not start; its log:\n{log_path.read_text()[-2000:]}")


def stop_service(proc: subprocess.Popen[str] | None, timeout_s: float = 30.0) -> None:
    """SIGTERM (graceful stop), then SIGKILL after ``timeout_s``."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)


def _drain(stream: Any) -> None:
    for _ in stream:
        pass
