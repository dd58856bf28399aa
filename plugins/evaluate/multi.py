"""PLACEHOLDER (being written): multi. Registers nothing yet."""
