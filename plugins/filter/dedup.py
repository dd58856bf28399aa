"""PLACEHOLDER (being written): dedup. Registers nothing yet."""
