"""PLACEHOLDER (being written): grpo. Registers nothing yet."""
