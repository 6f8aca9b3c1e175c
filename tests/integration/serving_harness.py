"""Serving processes for integration tests: ``python -m <module> ...`` on 127.0.0.1 port 0.

A process prints one JSON ``{"event": "ready", ...}`` line when it serves; the harness
waits for it. The child dies with the test process (``PR_SET_PDEATHSIG`` on Linux), so a
crashed test leaves no server behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

READY_TIMEOUT_S = 60.0

_LAUNCHER = (
    "import ctypes, os, signal, sys\n"
    "if sys.platform.startswith('linux'):\n"
    "    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)\n"  # PR_SET_PDEATHSIG
    "    if os.getppid() != int(sys.argv[1]):\n"
    "        sys.exit(3)\n"  # the parent died before prctl took effect
    "os.execv(sys.executable, [sys.executable, '-m', sys.argv[2], *sys.argv[3:]])\n"
)
# Linux sends PR_SET_PDEATHSIG when the *thread* that forked the child ends, not its
# process: a server started from a short-lived thread (a threading.Timer restarting a
# shard mid-call) was SIGKILLed the moment that thread returned. One long-lived thread
# forks every child.
_SPAWNER = ThreadPoolExecutor(1, thread_name_prefix="test-spawner")


def spawn_module(module: str, argv: list[str], log: Path) -> subprocess.Popen[str]:
    """``python -m module *argv`` that dies with this process, its stdout piped (text),
    its stderr appended to ``log``."""

    def popen() -> subprocess.Popen[str]:
        with open(log, "a") as err:
            return subprocess.Popen(
                [sys.executable, "-c", _LAUNCHER, str(os.getpid()), module, *argv],
                stdout=subprocess.PIPE,
                stderr=err,
                stdin=subprocess.DEVNULL,
                text=True,
            )

    return _SPAWNER.submit(popen).result()


class ServiceProcess:
    """One server process; ``ready`` holds its ready event (address, ports, ...)."""

    def __init__(self, module: str, argv: list[str], log: Path) -> None:
        self.module, self.argv, self.log = module, argv, log
        self.proc: subprocess.Popen[str] | None = None
        self.ready: dict[str, Any] = {}
        self.events: queue.Queue[dict[str, Any] | None] = queue.Queue()

    def start(self, timeout_s: float = READY_TIMEOUT_S) -> ServiceProcess:
        self.proc = spawn_module(self.module, self.argv, self.log)
        threading.Thread(target=self._read, daemon=True).start()
        try:
            event = self.events.get(timeout=timeout_s)
        except queue.Empty:
            event = None
        if event is None or event.get("event") != "ready":
            self.kill()
            raise RuntimeError(
                f"{self.module} not ready: {event}; log:\n{self.log.read_text()[-3000:]}"
            )
        self.ready = event
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict) and "event" in event:
                    self.events.put(event)
        self.events.put(None)

    @property
    def address(self) -> str:
        return str(self.ready["address"])

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM and wait; the exit code."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout_s)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
