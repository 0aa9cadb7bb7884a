"""The engine core in its own process: the API process sends token ids and sampling parameters, the core
sends back one message per step with every sequence's new token ids (``docs/architecture.md``)."""
