"""The small JetMoe trained by ``tools.train_tiny`` (``python -m tools.train_tiny``, not shipped in the wheel) and shipped inside the package."""

from __future__ import annotations

from pathlib import Path

BUNDLED_MODEL_DIR = Path(__file__).resolve().parent / "assets" / "tiny-jetmoe"
BUNDLED_MODEL_NAME = "tiny-jetmoe"
