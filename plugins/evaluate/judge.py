"""PLACEHOLDER (being written): judge. Registers nothing yet."""
