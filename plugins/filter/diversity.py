"""PLACEHOLDER (being written): diversity. Registers nothing yet."""
