"""Batched sampler: one step's logits `[B, V]` plus per-request parameters -> one token id per row.

Everything runs on the logits' device in float32. Order of operations (vLLM semantics):

1. Logprobs, when any row asks for them: `log_softmax` of the RAW model logits, i.e. the model's
   distribution before penalties, bias, temperature and filtering. The chosen token's logprob and the top-N
   alternatives are read from it.
2. Penalties (skipped entirely when no row uses them): repetition_penalty over prompt + output token ids
   (positive logits divided by it, negative ones multiplied), then frequency_penalty (minus penalty * count of
   the token in the output), then presence_penalty (minus penalty if the token occurs in the output).
3. logit_bias is added, then the hard masks (`logit_masks`: allowed_token_ids, min_tokens, bad_words) set
   tokens to -inf.
3b. Rows with an output constraint: tokens their grammar forbids next get -inf (``structured.matcher``).
4. Greedy rows (temperature ~0 or top_k == 1): argmax of the processed logits.
5. Other rows: divide by temperature, then top-k, then top-p (keep the smallest prefix of tokens by descending
   probability whose mass reaches top_p; the top token is always kept), then min-p (drop tokens whose
   probability is below min_p * the largest one), then sample with the exponential race
   `argmax(probs / q)`, q ~ Exponential(1). A seeded row draws q from its own generator, exactly one `[V]`
   vector per step, so its tokens do not depend on the rest of the batch; unseeded rows use the default RNG.

A batch of greedy rows without penalties or bias costs one argmax (plus the optional logprobs). The only
device -> host transfer is one `.tolist()` at the end.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from server.engine.logit_masks import TokenSequences, apply_token_masks
from server.engine.sampling_params import SamplingParams
from server.engine.structured.matcher import TokenBitmaskSource, apply_grammar_bitmask


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """A generator on `device` seeded with `seed`, owned by one request for its whole life."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


@dataclass
class SamplingRow:
    """One request's inputs for one sampling step."""

    params: SamplingParams
    prompt_ids: Sequence[int]
    output_ids: Sequence[int]
    generator: torch.Generator | None = None  # from make_generator() when params.seed is set
    bad_words: TokenSequences = ()  # token sequences never to complete (``bad_words_token_ids``)
    min_tokens_blocked: tuple[int, ...] = ()  # ids masked while fewer than params.min_tokens were generated
    grammar: TokenBitmaskSource | None = None  # the tokens its output constraint allows next


@dataclass
class SamplerOutput:
    """Result of one step. `logprobs` and `top_logprobs` are None when no row asked for logprobs.

    logprobs: the chosen token's logprob for every row (rows that did not ask get it too; it is free).
    top_logprobs: per row, the `params.logprobs` most likely (token_id, logprob) pairs by descending logprob;
    an empty list for rows that did not ask (or asked for 0).
    """

    token_ids: list[int]
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None


def _to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Host list -> tensor on `device` (pinned, non-blocking copy on CUDA)."""
    pin = device.type == "cuda"
    return torch.tensor(values, dtype=dtype, pin_memory=pin).to(device, non_blocking=pin)


def _column(values: list[float], device: torch.device) -> torch.Tensor:
    return _to_device(values, torch.float32, device).unsqueeze(1)  # [B, 1]


def token_counts(id_lists: Sequence[Sequence[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    """Count each token id per row with one scatter_add: `[B, V]` float32. Out-of-range ids are ignored."""
    batch = len(id_lists)
    length = max((len(ids) for ids in id_lists), default=0)
    counts = torch.zeros(batch, vocab_size + 1, dtype=torch.float32, device=device)  # [B, V + 1]
    if length == 0:
        return counts[:, :vocab_size]
    padded = [list(ids) + [vocab_size] * (length - len(ids)) for ids in id_lists]
    index = _to_device(padded, torch.long, device)  # [B, L]; pad id V lands in the spare column
    index = index.masked_fill((index < 0) | (index > vocab_size), vocab_size)  # [B, L]
    counts.scatter_add_(1, index, torch.ones_like(index, dtype=torch.float32))  # [B, V + 1]
    return counts[:, :vocab_size]  # [B, V]


def apply_penalties(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Repetition, then frequency, then presence penalties (out of place); `logits` is `[B, V]` float32."""
    if not any(row.params.uses_penalties for row in rows):
        return logits
    vocab, device = logits.shape[1], logits.device
    outputs = [row.output_ids if row.params.uses_penalties else () for row in rows]
    out_counts = token_counts(outputs, vocab, device)  # [B, V]
    repetition = [row.params.repetition_penalty for row in rows]
    if any(r != 1.0 for r in repetition):
        prompts = [row.prompt_ids if row.params.repetition_penalty != 1.0 else () for row in rows]
        seen = (token_counts(prompts, vocab, device) > 0) | (out_counts > 0)  # [B, V]
        penalty = _column(repetition, device)  # [B, 1]
        penalised = torch.where(logits > 0, logits / penalty, logits * penalty)  # [B, V]
        logits = torch.where(seen, penalised, logits)  # [B, V]
    frequency = [row.params.frequency_penalty for row in rows]
    presence = [row.params.presence_penalty for row in rows]
    if any(f != 0.0 for f in frequency):
        logits = logits - _column(frequency, device) * out_counts  # [B, V]
    if any(p != 0.0 for p in presence):
        logits = logits - _column(presence, device) * (out_counts > 0).float()  # [B, V]
    return logits


def apply_logit_bias(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Add each row's logit_bias (out of place). Token ids outside the logits' vocabulary are ignored."""
    vocab = logits.shape[1]
    row_idx, token_idx, bias = [], [], []
    for i, row in enumerate(rows):
        for token, value in row.params.logit_bias:
            if token < vocab:
                row_idx.append(i)
                token_idx.append(token)
                bias.append(value)
    if not bias:
        return logits
    device = logits.device
    index = (_to_device(row_idx, torch.long, device), _to_device(token_idx, torch.long, device))
    return logits.index_put(index, _to_device(bias, torch.float32, device), accumulate=True)  # [B, V]


def apply_top_k_top_p(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Mask (to -inf) tokens outside each row's top-k, then outside its top-p nucleus. `logits`: `[S, V]`."""
    vocab, device = logits.shape[1], logits.device
    top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    top_p = [p.top_p if p.top_p < 1.0 else float("inf") for p in params]
    if all(k == vocab for k in top_k) and all(p == float("inf") for p in top_p):
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # [S, V]
    ranks = torch.arange(vocab, device=device).unsqueeze(0)  # [1, V]
    outside_k = ranks >= _to_device(top_k, torch.long, device).unsqueeze(1)  # [S, V]
    sorted_logits = sorted_logits.masked_fill(outside_k, float("-inf"))  # [S, V]
    probs = sorted_logits.softmax(dim=-1)  # [S, V]
    mass_before = probs.cumsum(dim=-1) - probs  # [S, V] probability of all more likely tokens
    outside_p = mass_before >= _column(top_p, device)  # [S, V]
    outside_p[:, 0] = False  # NOTE: the most likely token always survives
    sorted_logits = sorted_logits.masked_fill(outside_p, float("-inf"))  # [S, V]
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)  # [S, V] back in vocab order


def apply_min_p(probs: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Zero probabilities below min_p * the row's largest one (unnormalised result). `probs`: `[S, V]`."""
    min_p = [p.min_p for p in params]
    if not any(m > 0.0 for m in min_p):
        return probs
    threshold = probs.amax(dim=-1, keepdim=True) * _column(min_p, probs.device)  # [S, 1]
    return probs.masked_fill(probs < threshold, 0.0)  # [S, V]


def exponential_noise(rows: Sequence[SamplingRow], vocab: int, device: torch.device) -> torch.Tensor:
    """q ~ Exponential(1), `[S, V]`: one `[V]` draw from each seeded row's generator, default RNG for the rest."""
    seeded = [(i, row.generator) for i, row in enumerate(rows) if row.generator is not None]
    if not seeded:
        return torch.empty(len(rows), vocab, device=device).exponential_()  # [S, V]
    noise = torch.empty(len(rows), vocab, device=device)  # [S, V]
    unseeded = [i for i, row in enumerate(rows) if row.generator is None]
    if unseeded:
        index = _to_device(unseeded, torch.long, device)  # [U]
        noise.index_copy_(0, index, torch.empty(len(unseeded), vocab, device=device).exponential_())
    for i, generator in seeded:
        noise[i].exponential_(generator=generator)  # [V], in place in row i
    return noise


def sample(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Temperature, top-k, top-p, min-p, then the exponential race. `logits`: processed `[S, V]` -> `[S]`."""
    params = [row.params for row in rows]
    temperature = _column([p.temperature for p in params], logits.device)  # [S, 1]
    logits = apply_top_k_top_p(logits / temperature, params)  # [S, V]
    probs = apply_min_p(logits.softmax(dim=-1), params)  # [S, V]
    noise = exponential_noise(rows, logits.shape[1], logits.device)  # [S, V]
    return (probs / noise.clamp_min_(torch.finfo(torch.float32).tiny)).argmax(dim=-1)  # [S]


def _to_host(parts: Sequence[torch.Tensor]) -> list[list[float]]:
    """Move several tensors to the host with a single `.tolist()` (float64 holds token ids exactly)."""
    flat = [part.reshape(-1).to(torch.float64) for part in parts]
    values = torch.cat(flat).tolist()
    out, start = [], 0
    for part in flat:
        out.append(values[start : start + part.numel()])
        start += part.numel()
    return out


class Sampler:
    """Turns one step's logits `[B, V]` into one token per row (see the module docstring for the order)."""

    @torch.no_grad()
    def __call__(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> SamplerOutput:
        """Sample a token for each row of `logits` (any float dtype; computed in float32)."""
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(
                f"logits must be [B, V] with B == len(rows) = {len(rows)}, got {tuple(logits.shape)}"
            )
        logits = logits.float()  # [B, V]; may alias the caller's tensor: only out-of-place ops below
        want_logprobs = any(row.params.logprobs is not None for row in rows)
        logprobs = logits.log_softmax(dim=-1) if want_logprobs else None  # [B, V] the model's distribution
        processed = apply_token_masks(apply_logit_bias(apply_penalties(logits, rows), rows), rows)  # [B, V]
        processed = apply_grammar_bitmask(processed, [row.grammar for row in rows])  # [B, V]
        token_ids = self._choose(processed, rows)  # [B]
        if logprobs is None:
            return SamplerOutput(token_ids=[int(t) for t in _to_host([token_ids])[0]])
        return self._with_logprobs(token_ids, logprobs, rows)

    @staticmethod
    def _choose(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        """Argmax for greedy rows, `sample` for the others. `logits`: `[B, V]` -> `[B]` int64."""
        random_rows = [i for i, row in enumerate(rows) if not row.params.greedy]
        if not random_rows:
            return logits.argmax(dim=-1)  # [B]
        if len(random_rows) == len(rows):
            return sample(logits, rows)  # [B]
        index = _to_device(random_rows, torch.long, logits.device)  # [S]
        sampled = sample(logits.index_select(0, index), [rows[i] for i in random_rows])  # [S]
        return logits.argmax(dim=-1).index_copy_(0, index, sampled)  # [B]

    @staticmethod
    def _with_logprobs(
        token_ids: torch.Tensor, logprobs: torch.Tensor, rows: Sequence[SamplingRow]
    ) -> SamplerOutput:
        """Gather the chosen logprobs and the top-N alternatives, then move everything in one transfer."""
        chosen = logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1)  # [B]
        top_n = [row.params.logprobs or 0 for row in rows]
        width = max(top_n)
        top_values, top_ids = logprobs.topk(width, dim=-1) if width else (chosen[:0], token_ids[:0])  # [B, N]
        ids, chosen_lp, values, indices = _to_host([token_ids, chosen, top_values, top_ids])
        top = [
            [(int(indices[i * width + j]), values[i * width + j]) for j in range(n)]
            for i, n in enumerate(top_n)
        ]
        return SamplerOutput(token_ids=[int(t) for t in ids], logprobs=chosen_lp, top_logprobs=top)
