"""Every script `make bench` / `make bench-quick` runs accepts --quick and is one of ours."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def bench_scripts(target: str) -> list[str]:
    out = subprocess.run(
        ["make", "-n", "-C", str(ROOT), target], capture_output=True, text=True, check=True
    ).stdout
    m = re.search(r"for b in ([^;]+);", out)
    assert m, f"no benchmark loop in `make -n {target}`:\n{out}"
    return m.group(1).split()


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_bench_quick_runs_every_benchmark_and_no_helper() -> None:
    scripts = bench_scripts("bench-quick")
    assert scripts == bench_scripts("bench")
    on_disk = sorted(
        f"benchmarks/{p.name}"
        for p in (ROOT / "benchmarks").glob("*.py")
        if not p.name.startswith("_")
    )
    assert sorted(scripts) == on_disk
    for script in scripts:
        help_text = subprocess.run(
            [sys.executable, str(ROOT / script), "--help"],
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
        ).stdout
        assert "--quick" in help_text, f"{script} takes no --quick"
