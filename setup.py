"""Package discovery only; everything else is in pyproject.toml.

Packages are found, not listed, so a new subpackage needs no edit. The bundled plugins live
in ``plugins/`` but import as ``stitchbench_plugins`` (``package-dir`` in pyproject.toml),
which ``[tool.setuptools.packages.find]`` cannot express: it names packages after their
directories.
"""

from setuptools import find_packages, setup

core = find_packages(include=["stitchbench", "stitchbench.*"])
bundled = ["stitchbench_plugins" + name[len("plugins"):] for name in find_packages(include=["plugins", "plugins.*"])]
setup(packages=core + bundled)
