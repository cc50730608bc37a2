"""Source-free adaptation of a trained model to a shifted domain (CASP and its baselines; stage `adapt`)."""
