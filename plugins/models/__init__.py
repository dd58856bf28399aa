"""Model providers: build the initial model of a run."""
