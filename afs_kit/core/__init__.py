"""Layer 0: argument checks, typed errors, device and precision, torch.distributed, the code version, atomic
writes and the one checkpoint format, intervals and paired tests. Imports nothing of the kit."""
