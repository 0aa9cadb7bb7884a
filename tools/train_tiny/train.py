"""Train the small JetMoe bundled with the server, on the Python standard library's own source (PSF licence).

    python -m tools.train_tiny --out model/assets/tiny-jetmoe [--steps 1200] [--threads 2]

Everything is offline and seeded: a Llama-style BPE tokenizer (byte fallback, ``▁`` spaces, ``<unk>``/``<s>``/
``</s>`` at 0/1/2) is trained on the corpus, then a JetMoe with the real architecture (mixture of attention
heads + mixture of MLP experts, top-2) is trained with transformers' implementation on CPU. The script prints
the loss curve and the held-out loss, and writes an HF checkpoint (config, bf16 safetensors, generation config,
tokenizer files) plus ``training_metadata.json`` with the figures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from pathlib import Path

import torch
from transformers import GenerationConfig, JetMoeConfig, JetMoeForCausalLM

from model.tokenizer import Tokenizer
from tools.train_tiny.tokenizer import train_llama_tokenizer

VOCAB_SIZE = 4096
SEQ_LEN = 256
MODEL_SHAPE = dict(
    hidden_size=256, num_hidden_layers=4, num_key_value_heads=4, kv_channels=32, intermediate_size=384,
    num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=2048,
)
_SKIP_PARTS = {"site-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "__pycache__"}


def corpus_files() -> list[Path]:
    """The standard library's Python sources, sorted so every machine of a kind reads the same list."""
    root = Path(os.__file__).parent
    files = [p for p in root.rglob("*.py") if not _SKIP_PARTS & set(p.relative_to(root).parts)]
    return sorted(files, key=lambda p: str(p.relative_to(root)))


def split_corpus(files: list[Path], seed: int) -> tuple[list[str], list[str]]:
    """About 5% of the files are held out for the final loss."""
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in files]
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    held = set(order[: max(1, len(order) // 20)])
    train = [t for i, t in enumerate(texts) if i not in held]
    return train, [t for i, t in enumerate(texts) if i in held]


def encode_stream(tokenizer: Tokenizer, texts: list[str]) -> torch.Tensor:
    """All documents as one token stream, each starting with ``<s>`` and ending with ``</s>``."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer.encode(text))
        ids.append(tokenizer.eos_token_id or 2)
    return torch.tensor(ids, dtype=torch.long)


def batches(stream: torch.Tensor, batch_size: int, generator: torch.Generator):
    """Endless random windows of ``SEQ_LEN + 1`` tokens."""
    while True:
        starts = torch.randint(0, len(stream) - SEQ_LEN - 1, (batch_size,), generator=generator)
        yield torch.stack([stream[s : s + SEQ_LEN + 1] for s in starts.tolist()])  # [B, L + 1]


def learning_rate(step: int, total: int, peak: float, warmup: int = 50) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def held_out_loss(model: JetMoeForCausalLM, stream: torch.Tensor, max_windows: int = 64) -> float:
    """Mean next-token loss over consecutive windows of the held-out stream."""
    model.eval()
    windows = stream[: (len(stream) // (SEQ_LEN + 1)) * (SEQ_LEN + 1)].view(-1, SEQ_LEN + 1)[:max_windows]
    losses = [_window_loss(model, w) for w in windows]
    model.train()
    return sum(losses) / len(losses)


def _window_loss(model: JetMoeForCausalLM, window: torch.Tensor) -> float:
    logits = model(window[None, :-1]).logits[0]  # [L, V]
    return torch.nn.functional.cross_entropy(logits.float(), window[1:]).item()


def train(args: argparse.Namespace) -> dict[str, object]:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    train_texts, held_texts = split_corpus(corpus_files(), args.seed)
    train_llama_tokenizer(train_texts, VOCAB_SIZE, out)
    tokenizer = Tokenizer.from_dir(out)
    train_stream, held_stream = encode_stream(tokenizer, train_texts), encode_stream(tokenizer, held_texts)
    print(f"corpus: {len(train_stream):,} training tokens, {len(held_stream):,} held-out tokens", flush=True)
    config = JetMoeConfig(vocab_size=tokenizer.vocab_size, **MODEL_SHAPE, output_router_logits=True,
                          aux_loss_coef=0.01, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)
    model = JetMoeForCausalLM(config)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    stream = batches(train_stream, args.batch_size, torch.Generator().manual_seed(args.seed))
    start, curve = time.monotonic(), []
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr)
        batch = next(stream)
        loss = model(batch[:, :-1], labels=batch[:, :-1]).loss  # transformers shifts the labels itself
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 25 == 0 or step == args.steps - 1:
            curve.append((step, round(loss.item(), 4)))
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.monotonic() - start:6.0f}s", flush=True)
    held = held_out_loss(model, held_stream)
    print(f"held-out loss {held:.4f} (uniform: {math.log(tokenizer.vocab_size):.4f})", flush=True)
    save(model, tokenizer, out)
    metadata = {
        "corpus": "Python standard library sources (PSF licence), Python "
                  f"{'.'.join(map(str, os.sys.version_info[:3]))}",
        "train_tokens": len(train_stream), "held_out_tokens": len(held_stream), "steps": args.steps,
        "batch_size": args.batch_size, "seq_len": SEQ_LEN, "seed": args.seed, "held_out_loss": round(held, 4),
        "uniform_loss": round(math.log(tokenizer.vocab_size), 4), "loss_curve": curve,
        "train_seconds": round(time.monotonic() - start),
    }
    (out / "training_metadata.json").write_text(json.dumps(metadata, indent=1) + "\n")
    return metadata


def save(model: JetMoeForCausalLM, tokenizer: Tokenizer, out: Path) -> None:
    """HF layout: config.json, bf16 model.safetensors, generation_config.json and the tokenizer files."""
    model.config.output_router_logits = False
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, do_sample=False)
    model.to(torch.bfloat16).save_pretrained(out)
    tokenizer.hf.save_pretrained(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(Path(__file__).parent / "assets" / "tiny-jetmoe"))
    parser.add_argument("--steps", type=int, default=900)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    train(args)


if __name__ == "__main__":
    main()
