"""PLACEHOLDER (being written): rag. Registers nothing yet."""
