"""PLACEHOLDER (being written): ensemble. Registers nothing yet."""
