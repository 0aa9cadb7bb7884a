"""``scripts/soak.py`` stays runnable: a few seconds of its mixed workload on an in-process server."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "soak.py"


@pytest.fixture(scope="module")
def soak():
    spec = importlib.util.spec_from_file_location("soak_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_short_soak_is_clean(soak, engine_checkpoint, tmp_path, capsys) -> None:
    out = tmp_path / "soak.json"
    status = soak.main(["--duration", "4", "--concurrency", "4", "--model", str(engine_checkpoint[0]),
                        "--progress", "0", "--json", str(out)])
    printed = capsys.readouterr().out
    summary = json.loads(out.read_text())
    assert status == 0, printed
    assert summary["errors"] == 0 and summary["leaked"] == 0 and summary["statuses"].get("200", 0) > 0
    assert summary["after_idle"]["kv_blocks_used"] == 0 and summary["rss_mib"]["end"] > 0
    assert "soak: OK" in printed


def test_only_loopback_targets(soak) -> None:
    for url in ("http://10.0.0.1:8000", "http://example.com", "http://192.168.1.2"):
        with pytest.raises(SystemExit):
            soak.require_loopback(url)
    for url in ("http://127.0.0.1:8000", "http://localhost:1", "http://[::1]:8000", "http://127.8.9.10"):
        soak.require_loopback(url)
