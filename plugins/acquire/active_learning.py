"""PLACEHOLDER (being written): active_learning. Registers nothing yet."""
