"""Decode steps replayed from CUDA graphs.

A decode step (every sequence adds one token) of JetMoe launches several hundred small kernels; at small
batches launching them costs more than running them. ``DecodeGraphs`` captures the whole forward once per batch
size of a ladder (``graph_batch_sizes``: 1, 2, 4, ... up to the largest batch) and replays it: a step of ``B``
sequences is padded to the next captured size, its inputs copied into the static buffers the graph reads
(``StaticDecodeBatch``), and the graph replayed; the logits of the first ``B`` rows are the step's.

Padding rows read and write only the padding block, a KV block outside the block manager's pool, so they never
touch a live sequence's cache. Capturing needs a forward that never waits for the host: kernels whose
``cuda_graph_safe`` holds (a capturable attention backend and sync-free expert matmuls, ``model.kernels``).
The attention metadata a graph reads comes from the backend's ``build_decode_metadata`` over the static
buffers, built inside the capture: what it computes on the device is replayed with the graph.

``capture=False`` runs the same padded static-buffer path eagerly, without graphs: that is how the padding and
buffer logic is tested on CPU.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import torch

from model.jetmoe import JetMoeForCausalLM
from model.layers.attention import AttentionBackend, AttentionMetadata, FlatBatch

# The static path never slices host block tables (``build_decode_metadata`` reads only the device tensors).
_NO_HOST_TABLES = torch.empty(0, 0, dtype=torch.int64)


def graph_batch_sizes(max_batch: int) -> tuple[int, ...]:
    """Powers of two below ``max_batch``, then ``max_batch`` itself: ``8 -> (1, 2, 4, 8)``, ``6 -> (1, 2, 4, 6)``."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be positive, got {max_batch}")
    sizes, size = [], 1
    while size < max_batch:
        sizes.append(size)
        size *= 2
    return (*sizes, max_batch)


class StaticDecodeBatch:
    """Device buffers of a padded decode batch of up to ``max_batch`` sequences, reused by every step.

    ``max_blocks`` is the block-table width (blocks of the longest sequence allowed); ``padding_block`` the
    block id padding rows use: a block the block manager never hands out.
    """

    def __init__(
        self, max_batch: int, max_blocks: int, block_size: int, padding_block: int, device: torch.device
    ) -> None:
        self.max_batch = max_batch
        self.block_size = block_size
        self.padding_block = padding_block
        self.input_ids = torch.zeros(max_batch, dtype=torch.long, device=device)  # [Bmax]
        self.positions = torch.zeros(max_batch, dtype=torch.long, device=device)  # [Bmax]
        self.slot_mapping = torch.full(
            (max_batch,), padding_block * block_size, dtype=torch.long, device=device
        )  # [Bmax]
        self.context_lens = torch.ones(max_batch, dtype=torch.int32, device=device)  # [Bmax]
        self.block_tables = torch.full(
            (max_batch, max_blocks), padding_block, dtype=torch.int32, device=device
        )  # [Bmax, max_blocks]
        self.rows = torch.arange(max_batch, device=device)  # [Bmax] flat token index of each row
        self.query_start_loc = torch.arange(max_batch + 1, dtype=torch.int32, device=device)  # [Bmax + 1]
        # Each step is staged in page-locked host buffers, so the copies to the device are truly asynchronous;
        # ``_staged`` marks when the last step's copies finished reading them.
        self.pinned = device.type == "cuda"
        self._device = {
            "input_ids": self.input_ids,
            "positions": self.positions,
            "slot_mapping": self.slot_mapping,
            "context_lens": self.context_lens,
            "block_tables": self.block_tables,
        }
        self._host = {
            name: torch.empty(buf.shape, dtype=buf.dtype, pin_memory=self.pinned) for name, buf in self._device.items()
        }
        self._staged = torch.cuda.Event() if self.pinned else None

    def metadata(self, backend: AttentionBackend, size: int) -> AttentionMetadata:
        """``backend``'s decode metadata over the first ``size`` rows of the buffers (what a graph of that size
        reads).

        NOTE: the Python tuples ``query_lens``/``context_lens`` are placeholders: a captured graph cannot see
        them change, so ``build_decode_metadata`` may not read them; the real context lengths are in the tensors.
        """
        batch = FlatBatch(
            block_size=self.block_size,
            query_lens=(1,) * size,
            context_lens=(1,) * size,
            query_start_loc=self.query_start_loc[: size + 1],
            seq_lens=self.context_lens[:size],
            block_tables=self.block_tables[:size],
            slot_mapping=self.slot_mapping[:size],
            logits_indices=self.rows[:size],
            host_block_tables=_NO_HOST_TABLES,
        )
        return backend.build_decode_metadata(batch)

    def load(
        self,
        token_ids: Sequence[int],
        context_lens: Sequence[int],
        block_tables: Sequence[Sequence[int]],
        size: int,
    ) -> None:
        """Copy one decode step into rows ``0..B-1`` and padding into rows ``B..size-1``.

        Sequence ``i`` adds token ``token_ids[i]`` at position ``context_lens[i] - 1``.
        """
        batch, bs, pad_block = len(token_ids), self.block_size, self.padding_block
        if not 0 < batch <= size <= self.max_batch:
            raise ValueError(f"cannot load {batch} sequences into a padded batch of {size} (max {self.max_batch})")
        pad = size - batch
        positions = [c - 1 for c in context_lens]
        slots = [table[p // bs] * bs + p % bs for table, p in zip(block_tables, positions)]
        width = max(-(-c // bs) for c in context_lens)
        if width > self.block_tables.shape[1]:
            raise ValueError(f"a context of {max(context_lens)} tokens exceeds the block-table width")
        # Entries past a row's context are never read by the kernels; they are padded for a rectangular copy.
        tables = [list(t[:width]) + [pad_block] * (width - len(t[:width])) for t in block_tables]
        tables += [[pad_block] * width] * pad
        if self._staged is not None:
            self._staged.synchronize()  # the previous step's copies may still be reading the host buffers
        self._copy("input_ids", (size,), [*token_ids, *[0] * pad])
        self._copy("positions", (size,), [*positions, *[0] * pad])
        self._copy("slot_mapping", (size,), [*slots, *[pad_block * bs] * pad])
        self._copy("context_lens", (size,), [*context_lens, *[1] * pad])
        self._copy("block_tables", (size, width), tables)
        if self._staged is not None:
            self._staged.record()

    def _copy(self, name: str, shape: tuple[int, ...], values: list) -> None:
        """``values`` into the leading ``shape`` of host buffer ``name``, then asynchronously to the device."""
        rows = tuple(slice(0, n) for n in shape)
        host = self._host[name][rows]
        host.copy_(torch.tensor(values, dtype=host.dtype))
        self._device[name][rows].copy_(host, non_blocking=True)


class DecodeGraphs:
    """Decode forwards captured at a ladder of batch sizes; ``run`` pads a step and replays the right one.

    ``kv_caches`` must hold the padding block ``padding_block``; ``max_blocks`` is the block-table width.
    """

    def __init__(
        self,
        model: JetMoeForCausalLM,
        kv_caches: list[torch.Tensor],
        batch_sizes: Sequence[int],
        max_blocks: int,
        block_size: int,
        padding_block: int,
        capture: bool = True,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.batch_sizes = tuple(sorted(set(batch_sizes)))
        self.capture = capture
        device = model.output_weight().device
        self.static = StaticDecodeBatch(self.batch_sizes[-1], max_blocks, block_size, padding_block, device)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, torch.Tensor] = {}
        if capture:
            self._capture_all()

    @property
    def max_batch(self) -> int:
        return self.batch_sizes[-1]

    def fits(self, query_lens: Sequence[int]) -> bool:
        """Whether a step with these per-sequence new-token counts can be replayed: all decodes, few enough."""
        return 0 < len(query_lens) <= self.max_batch and all(q == 1 for q in query_lens)

    def padded_size(self, batch: int) -> int:
        return self.batch_sizes[bisect.bisect_left(self.batch_sizes, batch)]

    def run(
        self, token_ids: Sequence[int], context_lens: Sequence[int], block_tables: Sequence[Sequence[int]]
    ) -> torch.Tensor:
        """Logits ``[B, V]`` of one decode step (one new token per sequence), as the eager forward gives them.

        The tensor is the graph's static output: valid until the next ``run``.
        """
        size = self.padded_size(len(token_ids))
        self.static.load(token_ids, context_lens, block_tables, size)
        if self.capture:
            self._graphs[size].replay()
            logits = self._outputs[size]
        else:
            logits = self._forward(size)
        return logits[: len(token_ids)]

    def _forward(self, size: int) -> torch.Tensor:
        static = self.static
        meta = static.metadata(self.model.attention_backend, size)
        return self.model(static.input_ids[:size], static.positions[:size], self.kv_caches, meta)  # [size, V]

    def _capture_all(self) -> None:
        # Largest first, all in one memory pool: the smaller graphs reuse the largest one's blocks.
        pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.batch_sizes):
            self._forward(size)  # warm-up: Triton compiles, cuBLAS picks kernels, probes run, outside capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._outputs[size] = self._forward(size)
            self._graphs[size] = graph
        torch.cuda.synchronize()
