"""``jetmoe-serve`` / ``python -m server``: flags, environment variables, startup errors, SIGTERM."""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from server.__main__ import main
from server.cli import build_parser, env_name, parse_args

FLAGS = ("--model", "--host", "--port", "--served-model-name", "--device", "--dtype", "--max-model-len",
         "--block-size", "--num-kv-blocks", "--kv-cache-memory", "--max-num-seqs", "--max-num-batched-tokens",
         "--max-queued-requests", "--api-key", "--log-level", "--gpu-memory-utilization", "--enforce-eager",
         "--attention-backend")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith("JETMOE_"):
            monkeypatch.delenv(name)


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("jetmoe-serve: error:")
    return err[0]


def test_help_lists_every_flag_and_its_variable(capsys) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for flag in FLAGS:
        assert flag in out and env_name(flag) in out
    assert "JETMOE_PORT" in out and "(default: 8000)" in out


def test_without_model_the_bundled_checkpoint_is_served() -> None:
    from model.bundled import BUNDLED_MODEL_DIR

    _, settings, config = parse_args([], environ={})
    assert config.model == str(BUNDLED_MODEL_DIR) and settings.served_model_name == "tiny-jetmoe"
    assert (BUNDLED_MODEL_DIR / "config.json").is_file()


def test_empty_model_is_refused(capsys) -> None:
    assert main(["--model", ""]) == 2
    assert "--model is required" in one_error_line(capsys)


@pytest.mark.parametrize("argv", [["--model", "x", "--bogus"], ["--model", "x", "--port", "http"],
                                  ["--model", "x", "--dtype", "int3"], ["--model", "x", "--block-size", "0"],
                                  ["--model", "x", "--kv-cache-memory", "lots"],
                                  ["--model", "x", "--num-kv-blocks", "8", "--kv-cache-memory", "1GiB"]])
def test_bad_flags_exit_2_with_one_line(capsys, argv) -> None:
    assert main(argv) == 2
    one_error_line(capsys)


def test_bad_environment_value(capsys, monkeypatch) -> None:
    monkeypatch.setenv("JETMOE_PORT", "abc")
    assert main(["--model", "x"]) == 2
    assert "--port" in one_error_line(capsys)


def test_environment_defaults_and_flags_win(tmp_path) -> None:
    model = tmp_path / "my-model"
    env = {"JETMOE_MODEL": str(model), "JETMOE_MAX_NUM_SEQS": "3", "JETMOE_API_KEY": "k",
           "JETMOE_KV_CACHE_MEMORY": "2MiB", "JETMOE_PORT": "9001", "JETMOE_DTYPE": "BF16"}
    args, settings, config = parse_args(["--port", "9002"], environ=env)
    assert args.port == 9002 and args.host == "127.0.0.1"
    assert settings.served_model_name == "my-model" and settings.api_key == "k"
    assert settings.max_queued_requests is None
    assert config.model == str(model) and config.max_num_seqs == 3 and config.kv_cache_memory == 2 << 20
    assert config.dtype == "bf16" and config.device == "auto" and config.num_kv_blocks is None
    _, settings, _ = parse_args(["--served-model-name", "x", "--max-queued-requests", "4"], environ=env)
    assert settings.served_model_name == "x" and settings.max_queued_requests == 4


def test_gpu_flags() -> None:
    _, _, config = parse_args([], environ={})
    assert config.gpu_memory_utilization == 0.9 and not config.enforce_eager and config.attention_backend == "auto"
    _, _, config = parse_args(["--enforce-eager", "--gpu-memory-utilization", "0.5", "--attention-backend",
                               "Torch"], environ={})
    assert config.enforce_eager and config.gpu_memory_utilization == 0.5 and config.attention_backend == "torch"
    env = {"JETMOE_ENFORCE_EAGER": "true", "JETMOE_GPU_MEMORY_UTILIZATION": "0.75"}
    _, _, config = parse_args([], environ=env)
    assert config.enforce_eager and config.gpu_memory_utilization == 0.75
    _, _, config = parse_args(["--enforce-eager", "false"], environ=env)
    assert not config.enforce_eager


@pytest.mark.parametrize("argv", [["--gpu-memory-utilization", "0"], ["--gpu-memory-utilization", "1.2"],
                                  ["--enforce-eager", "maybe"], ["--attention-backend", "flash"]])
def test_bad_gpu_flags_exit_2(capsys, argv) -> None:
    assert main(argv) == 2
    assert argv[0] in one_error_line(capsys)


def test_default_model_is_one_constant(monkeypatch, tmp_path) -> None:
    import server.cli as cli

    monkeypatch.setattr(cli, "DEFAULT_MODEL", str(tmp_path))
    _, settings, config = cli.parse_args([], environ={})
    assert config.model == str(tmp_path) and settings.served_model_name == tmp_path.name
    assert build_parser({"JETMOE_MODEL": "other"}).get_default("model") == "other"


def test_missing_model_directory(capsys, tmp_path) -> None:
    assert main(["--model", str(tmp_path / "nope"), "--port", "0"]) == 2
    assert "does not exist" in one_error_line(capsys)


def test_directory_without_checkpoint(capsys, tmp_path) -> None:
    assert main(["--model", str(tmp_path), "--port", "0", "--device", "cpu"]) == 2
    line = one_error_line(capsys)
    assert "cannot load the model" in line and "Traceback" not in line


def test_port_in_use(capsys, tmp_path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["--model", str(tmp_path), "--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in one_error_line(capsys)


def test_console_script_help() -> None:
    script = shutil.which("jetmoe-serve", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("the jetmoe-serve script is not installed")
    result = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "--served-model-name" in result.stdout


def _read_lines(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)


def test_serve_then_sigterm_finishes_stream_and_exits_0(engine_checkpoint) -> None:
    cmd = [sys.executable, "-m", "server", "--model", str(engine_checkpoint[0]), "--port", "0", "--device", "cpu",
           "--dtype", "float32", "--num-kv-blocks", "128", "--max-model-len", "512", "--served-model-name", "tiny",
           "--drain-timeout", "20", "--log-level", "info"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("JETMOE_")}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_read_lines, args=(proc.stderr, lines), daemon=True).start()
    try:
        startup = _wait_for_line(lines, "http://", 90)
        assert "cpu" in startup and "float32" in startup and "128 KV blocks" in startup and "'tiny'" in startup
        url = re.search(r"http://[\d.]+:\d+", startup).group(0)
        assert httpx.get(f"{url}/health").status_code == 200
        body = {"model": "tiny", "prompt": "Once", "max_tokens": 400, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
            events = response.iter_lines()
            assert next(e for e in events if e.startswith("data: "))
            proc.send_signal(signal.SIGTERM)
            data = [e[len("data: "):] for e in events if e.startswith("data: ")]
        assert data[-1] == "[DONE]" and json.loads(data[-2])["choices"][0]["finish_reason"] == "length"
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    rest = []
    while not lines.empty():
        rest.append(lines.get())
    assert not any("Traceback" in line for line in rest), "".join(rest)


def _wait_for_line(lines: queue.Queue, needle: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            continue
        seen.append(line)
        if needle in line:
            return line
    raise AssertionError("no startup line:\n" + "".join(seen))
