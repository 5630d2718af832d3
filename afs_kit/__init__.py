"""afs-kit: Adversarial Feature Stacking."""
