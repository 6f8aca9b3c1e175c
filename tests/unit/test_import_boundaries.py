"""The dependency direction is part of the architecture: embedding <- ps <- worker/serving,
and serving never reaches into worker or Ray."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def _modules_after(import_line: str) -> set[str]:
    code = f"import sys, json; {import_line}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return {m.split(".")[0] for m in json.loads(out.stdout)}


def test_embedding_pulls_in_no_grpc_ray_or_torch() -> None:
    loaded = _modules_after("import recps.embedding")
    assert not loaded & {"grpc", "ray", "torch"}, loaded & {"grpc", "ray", "torch"}
    assert "rocksdict" in loaded  # sanity: the check sees real imports


def test_recps_is_a_namespace_over_the_top_level_folders() -> None:
    import recps.embedding
    import recps.proto

    assert recps.embedding.__name__ == "recps.embedding"
    assert recps.proto.__file__ is not None and recps.proto.__file__.endswith("__init__.py")


def _full_modules_after(import_line: str) -> set[str]:
    code = f"import sys, json; {import_line}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return set(json.loads(out.stdout))


def _serving_modules() -> list[str]:
    import recps.serving

    folder = Path(recps.serving.__file__).parent
    return sorted(f"recps.serving.{p.stem}" for p in folder.glob("*.py") if p.stem != "__init__")


def test_serving_never_imports_worker_or_ray() -> None:
    modules = _serving_modules()
    assert "recps.serving.replica" in modules  # sanity: the glob sees the package
    loaded = _full_modules_after("; ".join(f"import {m}" for m in modules))
    assert set(modules) <= loaded  # sanity: they really were imported
    bad = {m for m in loaded if m.split(".")[0] == "ray" or m.startswith("recps.worker")}
    assert not bad, sorted(bad)


def test_serving_replica_process_pulls_in_no_torch() -> None:
    # The replica serves embeddings only; torch (seconds to import, GBs of RSS) stays out.
    # What a replica process imports by the time it serves (the gRPC parts load lazily).
    loaded = _modules_after(
        "import recps.serving.main, recps.serving.replica, recps.ps.server, "
        "recps.proto.serving_pb2_grpc"
    )
    assert not loaded & {"torch", "ray"}, loaded & {"torch", "ray"}
    assert "grpc" in loaded  # sanity
