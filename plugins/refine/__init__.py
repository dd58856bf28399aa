"""Stage 4 strategies: refine generation at inference."""
