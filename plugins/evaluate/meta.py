"""PLACEHOLDER (being written): meta. Registers nothing yet."""
