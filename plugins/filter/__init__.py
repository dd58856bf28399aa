"""Stage 2 strategies: score and drop rows."""
