"""A bare ``recps.ps.v1.Echo`` server: the gRPC ceiling that ``benchmarks/ps.py`` measures against.

    .venv/bin/python benchmarks/_echo_server.py --port 0   # prints {"event": "ready", "port": N}

It is built like a parameter-server shard (``ps/server.py``): the same thread pool size,
the same ``maximum_concurrent_rpcs`` and the same server options (message size limits,
no SO_REUSEPORT), but the handler does no work at all.

Payload sizes: a PS call is asymmetric (a Lookup sends ids and gets back rows; a Push
sends rows and gets back a few bytes), so a plain echo could not match it. The first 8
bytes of the request payload carry the size of the payload to answer with
(little-endian uint64). A payload that asks for its own size is echoed back as is; any
other size is answered with a cached zero-filled ``bytes`` of that size, so the handler
never allocates a payload per call.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from concurrent import futures
from typing import Any

import grpc

from recps.proto import ps_pb2, ps_pb2_grpc


class BareEcho(ps_pb2_grpc.EchoServicer):
    def __init__(self) -> None:
        self._replies: dict[int, bytes] = {}

    def Echo(self, request: ps_pb2.EchoRequest, context: Any) -> ps_pb2.EchoResponse:
        payload = request.payload
        size = int.from_bytes(payload[:8], "little") if len(payload) >= 8 else len(payload)
        if size == len(payload):
            return ps_pb2.EchoResponse(payload=payload)
        reply = self._replies.get(size)
        if reply is None:  # benign race: two threads may both build the same bytes
            reply = self._replies[size] = bytes(size)
        return ps_pb2.EchoResponse(payload=reply)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    # Defaults mirror recps.ps.config.ServerConfig so that the ceiling is like for like.
    p.add_argument("--max-workers", type=int, default=8)
    p.add_argument("--max-concurrent-rpcs", type=int, default=64)
    p.add_argument("--max-message-mb", type=int, default=256)
    a = p.parse_args()
    opts = [
        ("grpc.max_receive_message_length", a.max_message_mb << 20),
        ("grpc.max_send_message_length", a.max_message_mb << 20),
        ("grpc.so_reuseport", 0),
    ]
    server = grpc.server(
        futures.ThreadPoolExecutor(a.max_workers, thread_name_prefix="echo"),
        options=opts,
        maximum_concurrent_rpcs=a.max_concurrent_rpcs,
    )
    ps_pb2_grpc.add_EchoServicer_to_server(BareEcho(), server)
    port = server.add_insecure_port(f"{a.host}:{a.port}")
    if not port:
        print(f"cannot bind {a.host}:{a.port}", file=sys.stderr)
        return 1
    server.start()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    print(json.dumps({"event": "ready", "address": f"{a.host}:{port}", "port": port}), flush=True)
    done.wait()
    server.stop(0).wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
