"""The dependency direction is part of the architecture: embedding <- ps <- worker/serving."""

from __future__ import annotations

import json
import subprocess
import sys


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
