"""Test helpers for plugin authors: fake inputs of every kind and the conformance checks
``stitchbench plugins check`` runs. Importing this module imports torch.

::

    from stitchbench.testing import check_plugin, fake_context, fake_problem

    def test_my_index_conforms():
        check_plugin(MyIndex())          # raises PluginCheckError listing every problem

    def test_my_matcher_fits():
        layer = MyMatcher().fit(fake_problem(), MyMatcher.Params())
"""

from __future__ import annotations

from .checks import CheckResult, PluginCheckError, check_plugin, plugin_problems, run_checks
from .fakes import (
    MemoryJobRun,
    MemoryRunContext,
    TinyArchitecture,
    TinyNet,
    fake_context,
    fake_problem,
    tiny_data,
    tiny_networks,
)

__all__ = [
    "CheckResult",
    "MemoryJobRun",
    "MemoryRunContext",
    "PluginCheckError",
    "TinyArchitecture",
    "TinyNet",
    "check_plugin",
    "fake_context",
    "fake_problem",
    "plugin_problems",
    "run_checks",
    "tiny_data",
    "tiny_networks",
]
