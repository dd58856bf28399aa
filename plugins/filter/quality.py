"""PLACEHOLDER (being written): quality. Registers nothing yet."""
