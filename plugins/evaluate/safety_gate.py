"""PLACEHOLDER (being written): safety_gate. Registers nothing yet."""
