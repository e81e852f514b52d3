import importlib
import json
import os

import pytest


@pytest.fixture
def smoke_run(tmp_path, monkeypatch):
    """smoke_run(name, *flags) -> the schema-2 JSON record that `benchmarks/<name>.py --device cpu --quick` writes,
    the script imported as the suite runner imports it (tests/conftest.py puts the repository root first)."""
    # main() sets TRITON_INTERPRET for --device cpu; keep that out of the other tests' environment.
    monkeypatch.setenv("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "1"))

    def run(name: str, *flags: str) -> dict:
        bench = importlib.import_module(f"benchmarks.{name}")
        assert bench.main(["--device", "cpu", "--quick", "--out", str(tmp_path), *flags]) == 0
        (path,) = tmp_path.glob(f"{name}-cpu-*.json")
        record = json.loads(path.read_text())
        assert record["schema"] == 2 and record["benchmark"] == name
        return record

    return run
