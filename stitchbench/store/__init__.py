"""Everything MLflow: the store and its experiments, the lifecycle of parent and nested
runs, artifacts, the model registry, finding finished jobs by key, and reading reports
back. Knows nothing of torch models beyond saving and loading state dicts."""
