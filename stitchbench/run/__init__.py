"""One ``stitchbench run``: configuration and presets, the plan and its job keys, the cost
estimate, the network and matrix jobs, the pipeline that runs them, and the run context
that evaluations see."""
