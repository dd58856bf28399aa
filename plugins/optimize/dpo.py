"""PLACEHOLDER (being written): dpo. Registers nothing yet."""
