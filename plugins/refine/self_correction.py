"""PLACEHOLDER (being written): self_correction. Registers nothing yet."""
