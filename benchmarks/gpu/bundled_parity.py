"""Greedy outputs of the bundled model on the GPU against the CPU reference path, 32 prompts.

The reference is ``LLMEngine`` on CPU in fp32 with the torch attention and the per-expert loop. The GPU runs
are the engine as served on CUDA: Triton attention, CUDA graphs for decode steps, and

- ``cuda fp32``: the Triton grouped GEMM for the experts (fp32 does not take ``torch._grouped_mm``);
- ``cuda fp32 eager``: the same with ``enforce_eager`` (no graphs);
- ``cuda bf16``: the default dtype on CUDA, ``torch._grouped_mm`` experts.

fp32 runs must produce the reference's tokens up to each prompt's first near-tie (top-2 logprob gap of the
reference below ``NEAR_TIE``, where fp32 rounding on another device may flip the choice). bf16 is reported, not
judged: its rounding moves logits by about 1e-2, far more than many gaps between the top two tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

from model.bundled import BUNDLED_MODEL_DIR
from model.tokenizer import Tokenizer
from server.engine.config import EngineConfig
from server.engine.llm_engine import LLMEngine
from server.engine.sampling_params import SamplingParams
from tests.support.engine import run_engine, tokens_of
from tests.support.prompts import PYTHON_PROMPTS

MORE_PROMPTS = [
    "def main(argv=None):",
    "import re\n\n_pattern = re.compile(",
    "class Error(Exception):",
    "    def __eq__(self, other):",
    "def _check_type(value):",
    "with open(filename, 'rb') as f:",
    "    return self._data[",
    "__all__ = [",
    "def __init__(self, *args, **kwargs):",
    "        if not isinstance(",
    "    except KeyError:",
    "import threading\nimport time\n",
    "def encode(s, encoding='utf-8'):",
    "    for key, value in",
    "lines = text.splitlines()",
    "class Queue:\n    \"\"\"",
]
PROMPTS = PYTHON_PROMPTS + MORE_PROMPTS
MAX_TOKENS = 48
NEAR_TIE = 1e-3


@dataclass(frozen=True)
class Reference:
    tokens: list[int]
    trusted: int  # tokens before the first near-tie


def run_bundled(device: str, dtype: str, enforce_eager: bool = False, want_gaps: bool = False):
    """Greedy tokens (and the top-2 gaps when ``want_gaps``) per prompt, and whether graphs were used."""
    config = EngineConfig(model=str(BUNDLED_MODEL_DIR), device=device, dtype=dtype, num_kv_blocks=1024,
                          max_model_len=256, max_num_seqs=32, enforce_eager=enforce_eager)
    engine = LLMEngine.from_config(config)
    tok = Tokenizer.from_dir(BUNDLED_MODEL_DIR)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=2 if want_gaps else None)
    for i, text in enumerate(PROMPTS):
        engine.add_request(f"p{i}", tok.encode(text), params)
    outputs = run_engine(engine)
    results = []
    for i in range(len(PROMPTS)):
        deltas = outputs[(f"p{i}", 0)]
        tokens = tokens_of(deltas)
        if want_gaps:
            gaps = [lp.top[0][1] - lp.top[1][1] for d in deltas for lp in d.logprobs or []]
            trusted = next((j for j, gap in enumerate(gaps) if gap < NEAR_TIE), len(tokens))
            results.append(Reference(tokens, trusted))
        else:
            results.append(tokens)
    return results, engine.runner.decode_graphs is not None


def check_bundled_greedy() -> bool:
    """Print the agreement of every GPU variant with the CPU reference; True when the fp32 runs agree."""
    print(f"\nbundled model, {len(PROMPTS)} prompts x {MAX_TOKENS} greedy tokens, CPU fp32 reference", flush=True)
    reference, _ = run_bundled("cpu", "float32", want_gaps=True)
    trusted = sum(r.trusted for r in reference)
    print(f"  reference: {trusted} of {len(PROMPTS) * MAX_TOKENS} tokens before a near-tie (gap < {NEAR_TIE})")
    ok = True
    for name, dtype, eager, judged in (("cuda fp32", "float32", False, True),
                                       ("cuda fp32 eager", "float32", True, True),
                                       ("cuda bf16", "bfloat16", False, False)):
        tokens, graphs = run_bundled("cuda", dtype, enforce_eager=eager)
        same_prefix = sum(t[: r.trusted] == r.tokens[: r.trusted] for t, r in zip(tokens, reference))
        identical = sum(t == r.tokens for t, r in zip(tokens, reference))
        verdict = ("PASS" if same_prefix == len(PROMPTS) else "FAIL") if judged else "(reported)"
        print(f"  {name:<16} graphs {graphs!s:<5}: {same_prefix}/{len(PROMPTS)} equal up to the first near-tie, "
              f"{identical}/{len(PROMPTS)} identical in all {MAX_TOKENS} tokens  {verdict}", flush=True)
        if judged:
            ok = ok and same_prefix == len(PROMPTS) and graphs == (not eager)
    return ok
