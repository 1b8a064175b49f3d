"""Training jobs: the loop, strategies, checkpoints, EMA, logging, config, and the two objectives."""
