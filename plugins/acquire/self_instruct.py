"""PLACEHOLDER (being written): self_instruct. Registers nothing yet."""
