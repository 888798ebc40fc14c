"""Bundled stitchbench plugins."""
