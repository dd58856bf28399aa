"""PLACEHOLDER (being written): reward_model. Registers nothing yet."""
