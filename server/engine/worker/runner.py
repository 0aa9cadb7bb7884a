"""Model runner: turns a scheduled step into the model's flat tensors, runs the model once, samples.

All-decode steps replay a captured CUDA graph when ``enable_decode_graphs`` was called (``DecodeGraphs``);
every other step runs the model eagerly over ``build_flat_batch``'s metadata. A step that verifies proposed
tokens is not a decode step (several query tokens per sequence, logits at each): it always runs eagerly.

A request scheduled with proposed tokens gets logits at its last known token and at each proposed one, and one
sampling row per position (``server.engine.spec.verify``); its sampler output holds the tokens it keeps: the
accepted proposals and the model's own next token.

It also computes prompt log-probabilities (for ``echo`` with ``logprobs``): the logits at prompt position
``p`` give the log-probability of prompt token ``p + 1`` and its top alternatives.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from model.jetmoe import JetMoeForCausalLM
from model.layers.attention import allocate_kv_cache, kv_cache_bytes_per_block
from server.engine.request import Request, TokenLogprob
from server.engine.sampler import Sampler, SamplerOutput, SamplingRow
from server.engine.scheduler import ScheduledRequest, SchedulerOutput
from server.engine.spec.verify import (
    accepted_length,
    rewind_generators,
    rewindable_generator,
    verification_rows,
)
from server.engine.worker.batch import build_flat_batch
from server.engine.worker.decode_graphs import DecodeGraphs


@dataclass(frozen=True)
class StepInputs:
    """Flat token ids with, per scheduled request, where its logits rows are."""

    token_ids: list[int]
    query_lens: list[int]
    context_lens: list[int]
    block_tables: list[list[int]]
    logits_indices: list[int]
    sample_rows: list[int]  # logits rows of the requests that sample, in ``samplers`` order (1 + drafts each)
    samplers: list[ScheduledRequest]
    prompt_rows: list[tuple[ScheduledRequest, int, int]]  # request, first logits row, first prompt position


def kv_block_bytes(model: JetMoeForCausalLM, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one KV block takes across all layers."""
    c = model.config
    return kv_cache_bytes_per_block(c.num_layers, block_size, c.num_kv_heads, c.head_dim, dtype)


def kv_blocks_for_memory(
    model: JetMoeForCausalLM, block_size: int, memory_bytes: int, dtype: torch.dtype
) -> int:
    """How many KV blocks the block manager gets from ``memory_bytes`` (one more is the runner's padding block)."""
    return memory_bytes // kv_block_bytes(model, block_size, dtype) - 1


class ModelRunner:
    """Owns the KV cache tensors and runs one model call per engine step.

    The cache has ``num_blocks + 1`` blocks: the last one (``padding_block``) is never handed out by the block
    manager; padded rows of a graph-replayed decode step read and write only it.
    """

    def __init__(self, model: JetMoeForCausalLM, num_blocks: int, block_size: int) -> None:
        self.model = model
        self.block_size = block_size
        self.weight = model.output_weight()
        self.device = self.weight.device
        self.padding_block = num_blocks
        c = model.config
        self.kv_caches = allocate_kv_cache(
            c.num_layers, num_blocks + 1, block_size, c.num_kv_heads, c.head_dim, self.weight.dtype, self.device
        )
        self.sampler = Sampler()
        self.decode_graphs: DecodeGraphs | None = None

    def enable_decode_graphs(self, batch_sizes: Sequence[int], max_model_len: int, capture: bool = True) -> None:
        """Capture decode graphs at ``batch_sizes`` for sequences up to ``max_model_len`` tokens.

        ``capture=False`` replays eagerly through the same padded static buffers (CPU tests).
        """
        max_blocks = -(-max_model_len // self.block_size)
        self.decode_graphs = DecodeGraphs(
            self.model, self.kv_caches, batch_sizes, max_blocks, self.block_size, self.padding_block, capture
        )

    def execute(self, step: SchedulerOutput) -> dict[tuple[str, int], SamplerOutput]:
        """Run one step; returns, per sampling request key, the tokens it keeps (one, or with proposed tokens
        the accepted ones and the next) with their logprobs.

        Prompt log-probabilities are appended to ``request.prompt_logprobs`` as a side effect.
        """
        inputs = self._prepare(step.scheduled)
        logits = self._forward(inputs)  # [N, V]
        self._prompt_logprobs(logits, inputs.prompt_rows)
        if not inputs.samplers:
            return {}
        vocab = logits.shape[1]
        groups = [verification_rows(_sampling_row(s.request), s.draft_token_ids, vocab) for s in inputs.samplers]
        saved = [(g, g.get_state()) if g is not None else None  # before the draws, to give back unused ones
                 for g in map(rewindable_generator, groups)]
        sampled = self.sampler(logits[inputs.sample_rows], [row for rows in groups for row in rows])
        results: dict[tuple[str, int], SamplerOutput] = {}
        rewinds: list[tuple[torch.Generator, torch.Tensor, int]] = []
        start = 0
        for item, rows, generator_state in zip(inputs.samplers, groups, saved):
            kept = 1 + accepted_length(sampled.token_ids[start : start + len(rows)], item.draft_token_ids)
            results[item.request.key] = _rows_of(sampled, start, kept)
            if generator_state is not None and kept < len(rows):
                rewinds.append((*generator_state, kept))
            start += len(rows)
        rewind_generators(rewinds, vocab)
        return results

    def _forward(self, inputs: StepInputs) -> torch.Tensor:
        graphs = self.decode_graphs
        if graphs is not None and graphs.fits(inputs.query_lens):
            logits = graphs.run(inputs.token_ids, inputs.context_lens, inputs.block_tables)  # [B, V]
            if inputs.logits_indices == list(range(len(inputs.token_ids))):
                return logits  # every sequence samples: the usual decode step, no gather
            rows = torch.tensor(inputs.logits_indices, dtype=torch.long, device=self.device)  # [N]
            return logits.index_select(0, rows)  # [N, V]
        positions, meta = build_flat_batch(
            self.model.attention_backend,
            inputs.query_lens,
            inputs.context_lens,
            inputs.block_tables,
            self.block_size,
            device=self.device,
            logits_indices=inputs.logits_indices,
        )
        ids = torch.tensor(inputs.token_ids, dtype=torch.long, device=self.device)  # [T]
        return self.model(ids, positions, self.kv_caches, meta)  # [N, V]

    def _prepare(self, scheduled: Sequence[ScheduledRequest]) -> StepInputs:
        inputs = StepInputs([], [], [], [], [], [], [], [])
        for item in scheduled:
            request, start = item.request, item.request.num_computed_tokens
            end = start + item.num_new_tokens
            flat_start = len(inputs.token_ids)
            draft = item.draft_token_ids
            inputs.token_ids.extend(request.token_slice(start, end))
            inputs.token_ids.extend(draft)
            inputs.query_lens.append(item.num_scheduled_tokens)
            inputs.context_lens.append(end + len(draft))
            inputs.block_tables.append(request.block_ids)
            first_prompt = max(start, len(request.prompt_logprobs) - 1)
            if request.wants_prompt_logprobs and first_prompt < min(end, request.num_prompt_tokens - 1):
                inputs.prompt_rows.append((item, len(inputs.logits_indices), first_prompt))
                inputs.logits_indices.extend(
                    range(flat_start + first_prompt - start, flat_start + end - start)
                )
            elif item.completes:  # the last known token, then each proposed one
                last = flat_start + end - start - 1
                inputs.logits_indices.extend(range(last, last + 1 + len(draft)))
            if item.completes:
                first_row = len(inputs.logits_indices) - 1 - len(draft)
                inputs.sample_rows.extend(range(first_row, first_row + 1 + len(draft)))
                inputs.samplers.append(item)
        return inputs

    def _prompt_logprobs(self, logits: torch.Tensor, rows: list[tuple[ScheduledRequest, int, int]]) -> None:
        for item, row, first in rows:
            request = item.request
            if not request.prompt_logprobs:
                request.prompt_logprobs.append(None)  # the first prompt token has no logprob
            end = min(request.num_computed_tokens + item.num_new_tokens, request.num_prompt_tokens - 1)
            targets = torch.tensor(request.prompt_ids[first + 1 : end + 1], device=logits.device)  # [P]
            logprobs = torch.log_softmax(logits[row : row + len(targets)].float(), dim=-1)  # [P, V]
            chosen_t = logprobs.gather(1, targets[:, None])  # [P, 1]
            ranks = (logprobs > chosen_t).sum(dim=-1) + 1  # [P]
            chosen = chosen_t.squeeze(1).tolist()
            top_vals, top_ids = logprobs.topk(request.params.prompt_logprobs or 0, dim=-1)  # [P, N] each
            for token, value, ids, vals, rank in zip(targets.tolist(), chosen, top_ids.tolist(),
                                                     top_vals.tolist(), ranks.tolist()):
                request.prompt_logprobs.append(TokenLogprob(token, value, list(zip(ids, vals)), rank))


def _sampling_row(request: Request) -> SamplingRow:
    return SamplingRow(request.params, request.prompt_ids, request.output_ids, request.generator,
                       request.bad_words, request.min_tokens_blocked, request.grammar)


def _rows_of(output: SamplerOutput, start: int, count: int) -> SamplerOutput:
    end = start + count
    return SamplerOutput(
        token_ids=output.token_ids[start:end],
        logprobs=None if output.logprobs is None else output.logprobs[start:end],
        top_logprobs=None if output.top_logprobs is None else output.top_logprobs[start:end],
    )
