"""Benchmarks: afs-kit against the loops people use today, side by side in one run (`python -m benchmarks`).

Not part of `make test`: these are timed goals, not tests. See benchmarks/README.md.
"""
