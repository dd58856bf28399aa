"""PLACEHOLDER (being written): dataset. Registers nothing yet."""
