"""PLACEHOLDER (being written): adversarial. Registers nothing yet."""
