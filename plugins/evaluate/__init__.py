"""The evaluation layer: autonomous evaluators and meta-evaluators."""
