"""Benchmarks that ship with the package (run as `python -m sdjax.bench.<name>`)."""
