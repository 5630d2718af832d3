"""Layer 0, with afs_kit/errors.py (the typed errors): argument checks, device and precision, torch.distributed,
the code version, atomic writes and the one checkpoint format, intervals and paired tests."""
