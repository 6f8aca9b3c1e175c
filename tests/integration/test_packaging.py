"""Both install modes must expose the folders as `recps.*`: editable (dev) and wheel (deploy)."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_editable_install_maps_top_level_folders() -> None:
    code = (
        "import recps.embedding, recps.ps, recps.proto, recps.cli; print(recps.embedding.__file__)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd="/"
    )
    assert Path(out.stdout.strip()).resolve() == REPO / "embedding" / "__init__.py"


def test_wheel_contains_the_namespace_and_imports_from_it(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(REPO),
        ],
        check=True,
    )
    (wheel,) = (tmp_path / "dist").glob("recps-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for must in (
        "recps/embedding/tiered_store.py",
        "recps/proto/ps_pb2.py",
        "recps/proto/ps.proto",
        "recps/cli/main.py",
    ):
        assert must in names, must
    assert not any(n.startswith(("embedding/", "tests/", "proto/", "benchmarks/")) for n in names)
    assert "recps/__init__.py" not in names  # recps is a namespace package

    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "-q",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
    )
    # Isolated from the editable finder: -S skips site, so only the wheel's files and the
    # venv's third-party packages (added after it) are importable.
    site_pkgs = next(Path(sys.prefix).glob("lib/python*/site-packages"))
    env = {**os.environ, "PYTHONPATH": f"{target}{os.pathsep}{site_pkgs}"}
    code = (
        "import recps.embedding as e, recps.proto.ps_pb2 as p; import numpy as np;"
        "s = e.MemoryStore(e.TableConfig('t', 4)); print(s.lookup(np.arange(3)).shape);"
        "print(e.__file__)"
    )
    out = subprocess.run(
        [sys.executable, "-S", "-c", code],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
    ).stdout.split()
    assert out[0] == "(3,"
    assert out[-1].startswith(str(target))
