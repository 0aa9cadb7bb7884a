"""Offline corpora for training the small Llama-style tokenizers the tests and benchmarks use."""

from __future__ import annotations

import glob
import os
import sysconfig
from pathlib import Path

_STDLIB_SOURCES = ("os.py", "json/__init__.py", "textwrap.py", "string.py", "shutil.py", "argparse.py")
ENGLISH = (
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! How are you today?",
    "I love reading books and writing code in the morning.",
    "The model answered the question with a short and helpful reply.",
    "Once upon a time there was a little llama who lived in the mountains.",
)


def tokenizer_corpus() -> list[str]:
    """A few standard-library sources plus short English sentences (trains a ~1500-piece tokenizer fast)."""
    stdlib = Path(os.__file__).parent
    texts = [(stdlib / name).read_text(encoding="utf-8") for name in _STDLIB_SOURCES]
    return texts + list(ENGLISH) * 20


def stdlib_texts(recursive: bool = False) -> list[str]:
    """Every ``.py`` file of the standard library (top level, or the whole tree): enough for 32000 pieces."""
    root = sysconfig.get_paths()["stdlib"]
    pattern = os.path.join(root, "**", "*.py") if recursive else os.path.join(root, "*.py")
    texts = []
    for path in sorted(glob.glob(pattern, recursive=recursive)):
        with open(path, encoding="utf-8", errors="replace") as f:
            texts.append(f.read())
    return texts
