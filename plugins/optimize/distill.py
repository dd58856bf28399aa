"""PLACEHOLDER (being written): distill. Registers nothing yet."""
