"""Network mechanics (torch): the stitchable-network interface, the stitching layer and
stitched network, low-rank projections, data sets as the core sees them, activation
extraction, the training loop, and building blocks shared by plugins. Knows nothing of
MLflow, executors or runs."""
