"""PLACEHOLDER (being written): influence. Registers nothing yet."""
