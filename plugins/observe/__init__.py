"""Observers: plugins that watch the loop (drift and collapse monitors)."""
