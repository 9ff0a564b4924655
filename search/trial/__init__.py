"""One trial: the objective, the training loop, its artifacts."""
