"""Grammar-constrained requests under speculation: the matcher walks the proposed tokens and returns, proposals
the grammar refuses are cut there, and the outputs are those without speculation (greedy and seeded, n > 1)."""

from __future__ import annotations

import json

import jsonschema_rs

from model.bundled import BUNDLED_MODEL_DIR
from server.engine.config import EngineConfig
from server.engine.llm_engine import LLMEngine
from server.engine.sampling_params import SamplingParams
from server.engine.spec import SpeculativeConfig
from server.engine.structured import StructuredSpec
from tests.support.engine import run_engine, tokens_of
from tests.support.proposers import ReferenceProposer

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12},
    "tags": {"type": "array", "items": {"enum": ["aa", "bb", "cc"]}, "maxItems": 4}},
    "required": ["name", "tags"], "additionalProperties": False}
REQUESTS = {
    "json": SamplingParams(max_tokens=80, temperature=0, structured=StructuredSpec.json_schema(SCHEMA)),
    "json-seeded": SamplingParams(max_tokens=80, temperature=1.0, seed=3, n=2,
                                  structured=StructuredSpec.json_schema(SCHEMA)),
    "regex": SamplingParams(max_tokens=40, temperature=0, structured=StructuredSpec("regex", r"(ab|cd){3,12}")),
    "free": SamplingParams(max_tokens=40, temperature=0),
}


def run(spec: SpeculativeConfig | None, proposer=None) -> tuple[dict, LLMEngine]:
    engine = LLMEngine.from_config(EngineConfig(model=str(BUNDLED_MODEL_DIR), device="cpu", dtype="float32",
                                                num_kv_blocks=128, max_model_len=256, speculative_config=spec))
    if proposer is not None:
        engine.core.spec.proposer = proposer
    for i, (rid, params) in enumerate(REQUESTS.items()):
        engine.add_request(rid, engine.tokenizer.encode(f"x = {i}\n" * 4), params)
    outputs = run_engine(engine)
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    return {key: (tokens_of(d), "".join(x.new_text for x in d), d[-1].finish_reason) for key, d in outputs.items()}, engine


def test_constrained_outputs_do_not_change_under_speculation() -> None:
    plain, engine = run(None)
    for key in (("json", 0), ("json-seeded", 0), ("json-seeded", 1)):
        assert plain[key][2] == "stop"
        jsonschema_rs.validate(SCHEMA, json.loads(plain[key][1]))
    spec = SpeculativeConfig(4, prompt_lookup_min=1, prompt_lookup_max=3)
    ngram, engine = run(spec)
    assert ngram == plain
    # Known continuations with wrong tokens in them: the grammar refuses many of those.
    reference = ReferenceProposer({key: value[0] for key, value in plain.items()}, engine.vocab_size)
    proposed, engine = run(spec, reference)
    assert proposed == plain
    stats = engine.stats()
    assert stats.spec_decode_num_draft_tokens > stats.spec_decode_num_accepted_tokens > 20
