"""evaluate: top-1, loss, size and CPU latency of the pipeline's current model."""
