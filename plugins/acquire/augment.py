"""PLACEHOLDER (being written): augment. Registers nothing yet."""
