"""PLACEHOLDER (being written): vllm. Registers nothing yet."""
