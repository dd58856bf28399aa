"""Tasks: where prompts, difficulty levels and references come from."""
