"""PLACEHOLDER (being written): cot. Registers nothing yet."""
