"""PLACEHOLDER (being written): drift. Registers nothing yet."""
