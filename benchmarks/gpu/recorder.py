"""Results that survive a crash or a timeout: each measurement is printed and saved the moment it is taken.

``Recorder.section(name, fn)`` runs one guarded measurement: an exception (out of memory, an API a library
version lacks) becomes a note and the run goes on; after every section the JSON file is rewritten in full, so
a ``timeout`` kill loses only the section it interrupted.
"""

from __future__ import annotations

import json
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypeVar

import torch

T = TypeVar("T")


@dataclass
class Results:
    device: str
    shapes: dict
    matmul_tflops: float = 0.0
    copy_tb_per_s: float = 0.0
    prefill: dict = field(default_factory=dict)
    decode: list = field(default_factory=list)
    served: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)


class Recorder:
    """Guarded sections over one ``Results``, saved as JSON to ``path`` (when given) after each."""

    def __init__(self, results: Results, path: Path | None) -> None:
        self.results = results
        self.path = path
        self.save()

    def save(self) -> None:
        if self.path is not None:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(asdict(self.results), indent=2))
            tmp.replace(self.path)  # never a half-written file

    def section(self, name: str, fn: Callable[[], T]) -> T | None:
        """``fn()``, or ``None`` with a note when it raises; prints the time it took, saves the results."""
        print(f"{name} ...", flush=True)
        start = time.perf_counter()
        try:
            return fn()
        except torch.cuda.OutOfMemoryError:
            self.note(f"{name}: out of memory")
        except Exception as exc:  # noqa: BLE001 - report and carry on with the other figures
            self.note(f"{name}: {type(exc).__name__}: {exc}")
            traceback.print_exc()
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            print(f"  ({time.perf_counter() - start:.1f} s)", flush=True)
            self.save()
        return None

    def note(self, text: str) -> None:
        self.results.notes.append(text)
        print(f"  NOTE {text}", flush=True)
