"""Layer 8: the run directory and its lock, `Run` (every stage over one directory), controls, export."""
