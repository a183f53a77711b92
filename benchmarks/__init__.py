"""Benchmark scripts and peer adapters: lmcore measured against reference implementations in the same run."""
