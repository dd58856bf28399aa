"""PLACEHOLDER (being written): best_of_n. Registers nothing yet."""
