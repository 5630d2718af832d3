"""Layer 5: extractor training, the merger's training and its start, saved progress and training health."""
