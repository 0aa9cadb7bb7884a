"""The bundled tiny JetMoe: trained (loss well below uniform), loadable by transformers, and served with
exactly transformers' greedy output."""

from __future__ import annotations

import json
import math

import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from model.bundled import BUNDLED_MODEL_DIR
from model.tokenizer import Tokenizer
from server.engine.config import EngineConfig
from server.engine.llm_engine import LLMEngine
from server.engine.sampling_params import SamplingParams
from tests.support.engine import hf_greedy, run_engine, tokens_of
from tests.support.live_server import greedy_reference, live_server
from tests.support.prompts import PYTHON_PROMPTS


@pytest.fixture(scope="module")
def reference():
    model = AutoModelForCausalLM.from_pretrained(BUNDLED_MODEL_DIR, dtype=torch.float32).eval()
    return model, Tokenizer.from_dir(BUNDLED_MODEL_DIR)


def test_checkpoint_layout_and_size() -> None:
    names = {p.name for p in BUNDLED_MODEL_DIR.iterdir()}
    for required in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                     "tokenizer_config.json", "training_metadata.json"):
        assert required in names
    assert sum(p.stat().st_size for p in BUNDLED_MODEL_DIR.iterdir()) < 25 * 2**20
    config = json.loads((BUNDLED_MODEL_DIR / "config.json").read_text())
    assert config["model_type"] == "jetmoe" and config["num_experts_per_tok"] == 2
    assert config["num_local_experts"] > 2


def test_trained_loss_is_far_below_uniform() -> None:
    meta = json.loads((BUNDLED_MODEL_DIR / "training_metadata.json").read_text())
    vocab = json.loads((BUNDLED_MODEL_DIR / "config.json").read_text())["vocab_size"]
    assert meta["uniform_loss"] == pytest.approx(math.log(vocab), abs=1e-3)
    assert meta["held_out_loss"] < 0.5 * math.log(vocab)
    assert meta["loss_curve"][-1][1] < meta["loss_curve"][0][1] - 3


def test_tokenizer_is_llama_style() -> None:
    hf_tok = AutoTokenizer.from_pretrained(BUNDLED_MODEL_DIR)
    assert hf_tok.convert_ids_to_tokens([0, 1, 2, 3]) == ["<unk>", "<s>", "</s>", "<0x00>"]
    tok = Tokenizer.from_dir(BUNDLED_MODEL_DIR)
    for text in ("def f(x):\n    return x", "naïve café 🦙 日本語"):
        assert tok.decode(tok.encode(text)) == text
    chat = tok.render_chat([{"role": "user", "content": "hi"}])
    assert chat == "<s><|user|>\nhi</s>\n<|assistant|>\n"


def test_engine_greedy_equals_transformers_on_python_prompts(reference) -> None:
    hf, tok = reference
    engine = LLMEngine.from_config(EngineConfig(model=str(BUNDLED_MODEL_DIR), device="cpu", dtype="float32",
                                                num_kv_blocks=512, max_model_len=256))
    expected = {}
    for i, text in enumerate(PYTHON_PROMPTS):
        ids = tok.encode(text)
        expected[f"p{i}"] = hf_greedy(hf, ids, 24)
        engine.add_request(f"p{i}", ids, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    outputs = run_engine(engine)
    compared = 0
    for rid, (tokens, trusted) in expected.items():
        assert tokens_of(outputs[(rid, 0)])[:trusted] == tokens[:trusted], rid
        compared += trusted
    assert compared >= 0.9 * 24 * len(PYTHON_PROMPTS), "a trained model should rarely tie"


def test_server_greedy_text_equals_transformers(reference) -> None:
    hf, tok = reference
    with live_server(BUNDLED_MODEL_DIR) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="unused")
        for text in PYTHON_PROMPTS[:4]:
            ref = greedy_reference(hf, tok, tok.encode(text), 24)
            got = client.completions.create(model="tiny-jetmoe", prompt=text, max_tokens=ref.max_tokens,
                                            temperature=0)
            assert got.choices[0].text == ref.text and ref.text.strip()
