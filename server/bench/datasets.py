"""The prompts a run sends: random ones (seeded), a ShareGPT JSON file, or a JSONL file of prompts."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.bench.config import BenchError, BenchmarkConfig

# Random chat prompts are made of these words; each is one or a few tokens in most tokenizers.
_WORD_TEXT = (
    "the of and to in is it that for was on are as with his they at be this from have or by one had not but "
    "what all were when we there can an your which their said if do will each about how up out them then she "
    "many some so these would other into has more her two like him see time could no make than first been its "
    "who now people my made over did down only way find use may water long little very after words called just "
    "where most know get through back much before go good new write our used me man too any day same right look "
    "think also around another came come work three word must because does part even place well such here take "
    "why help put different away again off went old number great tell men say small every found still between "
    "name should home big give air line set own under read last never us left end along while might next sound"
)
WORDS = tuple(_WORD_TEXT.split())

CHARS_PER_TOKEN = 4  # estimate of a text's token count when the server does not report it


@dataclass
class SampleRequest:
    """One prompt to send: text or token ids, its length in tokens (exact for ids), tokens to generate."""

    prompt: str | list[int]
    prompt_len: int
    output_len: int


def estimate_tokens(text: str) -> int:
    """A rough token count for text (about 4 characters a token); the server's usage replaces it."""
    return max(1, round(len(text) / CHARS_PER_TOKEN))


def length_bounds(length: int, range_ratio: float) -> tuple[int, int]:
    """``[length * (1 - r), length * (1 + r)]`` as integers, at least 1 (vLLM's ``--random-range-ratio``)."""
    low = max(1, int(length * (1.0 - range_ratio)))
    high = max(low, int(length * (1.0 + range_ratio)))
    return low, high


def random_requests(config: BenchmarkConfig, as_text: bool) -> list[SampleRequest]:
    """``num_prompts`` random prompts: token ids in ``[0, random_vocab_size)``, or words for chat."""
    rng = random.Random(config.seed)
    in_low, in_high = length_bounds(config.random_input_len, config.random_range_ratio)
    out_low, out_high = length_bounds(config.random_output_len, config.random_range_ratio)
    requests = []
    for _ in range(config.num_prompts):
        input_len = rng.randint(in_low, in_high)
        output_len = rng.randint(out_low, out_high)
        if as_text:
            prompt: str | list[int] = " ".join(rng.choice(WORDS) for _ in range(input_len))
        else:
            prompt = [rng.randrange(config.random_vocab_size) for _ in range(input_len)]
        requests.append(SampleRequest(prompt, input_len, output_len))
    return requests


def sharegpt_requests(config: BenchmarkConfig) -> list[SampleRequest]:
    """First human turn of each conversation as the prompt, shuffled with the seed (as vLLM does).

    The output length is ``sharegpt_output_len`` or, without it, the estimated length of the reply.
    """
    data = _read_json(Path(config.dataset_path or ""))
    if not isinstance(data, list):
        raise BenchError(f"{config.dataset_path}: a ShareGPT file is a JSON list of conversations")
    pairs = []
    for entry in data:
        turns = entry.get("conversations") if isinstance(entry, dict) else None
        if isinstance(turns, list) and len(turns) >= 2 and str(turns[0].get("value", "")).strip():
            pairs.append((str(turns[0]["value"]), str(turns[1].get("value", ""))))
    random.Random(config.seed).shuffle(pairs)
    requests = []
    for prompt, reply in pairs[: config.num_prompts]:
        output_len = config.sharegpt_output_len or estimate_tokens(reply)
        requests.append(SampleRequest(prompt, estimate_tokens(prompt), output_len))
    return requests


def jsonl_requests(config: BenchmarkConfig) -> list[SampleRequest]:
    """One JSON object a line: ``prompt`` (text or token ids) and optionally ``output_len``/``max_tokens``."""
    path = Path(config.dataset_path or "")
    requests = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BenchError(f"{path}:{number}: not JSON ({exc.msg})") from None
        requests.append(_jsonl_entry(entry, config.random_output_len, f"{path}:{number}"))
        if len(requests) == config.num_prompts:
            break
    return requests


def _jsonl_entry(entry: Any, default_output_len: int, where: str) -> SampleRequest:
    prompt = entry.get("prompt", entry.get("text")) if isinstance(entry, dict) else None
    if isinstance(prompt, str) and prompt:
        prompt_len = estimate_tokens(prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        prompt_len = len(prompt)
    else:
        raise BenchError(f"{where}: needs a non-empty \"prompt\" (a string or a list of token ids)")
    output_len = entry.get("output_len", entry.get("max_tokens", default_output_len))
    if not isinstance(output_len, int) or output_len < 1:
        raise BenchError(f"{where}: output_len must be a positive integer")
    return SampleRequest(prompt, prompt_len, output_len)


def load_requests(config: BenchmarkConfig) -> list[SampleRequest]:
    """The run's prompts, checked against the endpoint (chat takes text only)."""
    chat = config.endpoint == "chat"
    if config.dataset_name == "random":
        requests = random_requests(config, as_text=chat)
    elif config.dataset_name == "sharegpt":
        requests = sharegpt_requests(config)
    elif config.dataset_name == "jsonl":
        requests = jsonl_requests(config)
    else:
        raise BenchError(f"unknown dataset {config.dataset_name!r}: random, sharegpt or jsonl")
    if not requests:
        raise BenchError(f"no prompts in {config.dataset_path}")
    if chat and any(not isinstance(r.prompt, str) for r in requests):
        raise BenchError("the chat endpoint takes text prompts, not token ids")
    return requests


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise BenchError(f"cannot read dataset {str(path)!r}: {exc.strerror or exc}") from None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise BenchError(f"{path}: not JSON ({exc.msg} at line {exc.lineno})") from None
