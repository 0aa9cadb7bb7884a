"""Structured outputs: output constraints (``spec``), their compilation (``compiler``) and the per-sequence
grammar state and batch bitmask the sampler applies (``matcher``)."""

from server.engine.structured.spec import StructuredOutputError, StructuredSpec

__all__ = ["StructuredOutputError", "StructuredSpec"]
