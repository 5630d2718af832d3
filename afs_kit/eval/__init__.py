"""Layer 6: per-example flags, evaluation records in chunks, masking checks and stack attacks, cost estimates."""
