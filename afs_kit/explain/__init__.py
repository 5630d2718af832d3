"""Layer 7: Delta-z and the concavity rule, t-SNE, the merger's weights, costs, the frontier, the paper's numbers."""
