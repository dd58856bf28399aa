"""Stage 1 strategies: acquire candidate training rows."""
