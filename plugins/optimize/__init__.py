"""Stage 3 strategies: train a candidate model."""
