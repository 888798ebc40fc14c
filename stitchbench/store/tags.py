"""The MLflow tags stitchbench puts on its runs (and on registered model versions)."""

TAG_KIND = "stitchbench.kind"  # parent | network | stitch_matrix | index_matrix | evaluation | a plugin's job kind
TAG_KEY = "stitchbench.job_key"
TAG_COMPLETE = "stitchbench.complete"  # "1" once every output of the job is written
TAG_PLUGIN = "stitchbench.plugin"
