"""Helpers shared by the tests, the benchmarks and the scripts: random checkpoints, tokenizers, a live
server, engine drivers, and the Triton interpreter/compile setup. Import the module you need; this package
imports nothing itself (the GPU scripts run where the server's HTTP packages are missing)."""
