"""Speculative decoding by n-gram (prompt lookup) proposals, verified in the step that computes them.

``config`` (``SpeculativeConfig``), ``ngram`` (the proposer), ``decoder`` (per-sequence proposal lengths and
the counters, engine side) and ``verify`` (one sampling row per verified position, acceptance, runner side).
"""

from server.engine.spec.config import SpeculativeConfig

__all__ = ["SpeculativeConfig"]
