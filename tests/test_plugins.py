"""The plugin system: discovery, origins, registration, validation, broken plugins."""

from __future__ import annotations

import json
import textwrap

import pytest

import stitchbench
from stitchbench.errors import PluginError, UsageError
from stitchbench.plugin.manager import list_plugins, load_plugins

from .conftest import cli

BUNDLED = {
    "dataset": {"digits", "cifar10", "svhn", "imagenet", "noise"},
    "architecture": {"resnet18", "vit_tiny"},
    "matcher": {"dm", "tlm"},
    "similarity_index": {"lcka", "pwcca", "opd", "dm_struct"},
    "evaluation": {"layer_identification"},
}

INDEX_PLUGIN = """
import numpy as np
import stitchbench

class MeanCosine(stitchbench.SimilarityIndex):
    '''Cosine of the mean activation vectors (a test plugin).'''
    name = "{name}"
    higher_is_more_similar = True

    def compute(self, A, B):
        a = np.asarray(A, float).reshape(len(A), -1).mean(0)
        b = np.asarray(B, float).reshape(len(B), -1).mean(0)
        k = min(len(a), len(b))
        a, b = a[:k], b[:k]
        return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))

@stitchbench.hookimpl
def register_similarity_indices(register):
    register(MeanCosine())
"""


def write_plugin(path, text):
    path.write_text(textwrap.dedent(text))
    return path


def test_every_bundled_plugin_is_listed_with_its_kind(workspace):
    got = {(i.kind, i.name) for i in list_plugins()}
    for kind, names in BUNDLED.items():
        for name in names:
            assert (kind, name) in got
    assert all(i.origin == "bundled" for i in list_plugins() if i.name in set().union(*BUNDLED.values()))
    assert all(i.description for i in list_plugins())


def test_list_by_kind_and_unknown_kind(workspace):
    assert {i.name for i in stitchbench.list_plugins("matcher")} >= {"dm", "tlm"}
    assert all(i.kind == "matcher" for i in stitchbench.list_plugins("matcher"))
    with pytest.raises(UsageError, match="the kinds are"):
        stitchbench.list_plugins("matchers")


def test_get_plugin_unknown_name_lists_known_and_suggests(workspace):
    with pytest.raises(UsageError) as e:
        stitchbench.get_plugin("lckaa", "similarity_index")
    assert "lcka" in str(e.value) and "did you mean 'lcka'" in str(e.value)
    with pytest.raises(UsageError, match="is a matcher, not a similarity index"):
        stitchbench.get_plugin("dm", "similarity_index")


def test_cli_plugins_list_json(workspace):
    p = cli("plugins", "list", "--json", cwd=workspace)
    assert p.returncode == 0, p.stderr
    data = json.loads(p.stdout)
    assert {"name", "kind", "origin", "description"} <= set(data[0])
    kinds = {d["name"]: d["kind"] for d in data}
    for kind, names in BUNDLED.items():
        for name in names:
            assert kinds[name] == kind
    p = cli("plugins", "list", "--kind", "matcher", cwd=workspace)
    assert p.returncode == 0 and "tlm" in p.stdout and "lcka" not in p.stdout


def test_register_a_file_plugin_then_unregister(workspace, tmp_path):
    f = write_plugin(tmp_path / "mean_cosine.py", INDEX_PLUGIN.format(name="mean_cosine"))
    p = cli("plugins", "register", str(f), cwd=workspace)
    assert p.returncode == 0, p.stderr
    assert (workspace / "registry" / "plugins.toml").exists()
    p = cli("plugins", "list", "--json", cwd=workspace)
    rows = {d["name"]: d for d in json.loads(p.stdout)}
    assert rows["mean_cosine"]["kind"] == "similarity_index"
    assert rows["mean_cosine"]["origin"] == f"registered path {f}"
    assert rows["mean_cosine"]["location"] == str(f)
    assert stitchbench.get_plugin("mean_cosine").compute([[1.0, 0.0]], [[1.0, 0.0]]) == pytest.approx(1.0)
    p = cli("plugins", "register", str(f), cwd=workspace)
    assert p.returncode == 2 and "already registered" in p.stderr
    p = cli("plugins", "unregister", "mean_cosine", cwd=workspace)
    assert p.returncode == 0, p.stderr
    p = cli("plugins", "list", "--json", cwd=workspace)
    assert "mean_cosine" not in {d["name"] for d in json.loads(p.stdout)}
    p = cli("plugins", "unregister", "mean_cosine", cwd=workspace)
    assert p.returncode == 2 and "no registered plugin" in p.stderr


def test_register_missing_path_is_a_usage_error(workspace, tmp_path):
    p = cli("plugins", "register", str(tmp_path / "nope.py"), cwd=workspace)
    assert p.returncode == 2
    assert "does not exist" in p.stderr and "Traceback" not in p.stderr
    p = cli("plugins", "register", "no_such_module_xyz", cwd=workspace)
    assert p.returncode == 2 and "cannot be found" in p.stderr


def test_two_plugins_registering_one_name(workspace, tmp_path):
    f = write_plugin(tmp_path / "clash.py", INDEX_PLUGIN.format(name="lcka"))
    p = cli("plugins", "register", str(f), cwd=workspace)
    assert p.returncode == 2, p.stdout
    assert "'lcka'" in p.stderr and "clash" in p.stderr and "lcka" in p.stderr and "Traceback" not in p.stderr
    # The same clash in the registry (registered first, the package installed later): the
    # workspace's registration wins, with a warning that names both; every command works.
    (workspace / "registry").mkdir(exist_ok=True)
    (workspace / "registry" / "plugins.toml").write_text(f'[[plugin]]\nname = "clash"\npath = "{f}"\n')
    p = cli("plugins", "list", "--json", cwd=workspace)
    assert p.returncode == 0, p.stderr
    assert "plugin clash" in p.stderr and "plugin lcka (bundled)" in p.stderr and "is used instead" in p.stderr
    (lcka,) = [d for d in json.loads(p.stdout) if d["name"] == "lcka"]
    assert lcka["origin"].startswith("registered path") and lcka["plugin"] == "clash"


def test_a_registered_plugin_wins_over_an_installed_one_of_the_same_name(workspace, tmp_path):
    """Registered by path as `lcka_plus`, later installed (an entry point of the same
    plugin name): the path registration is used, with a warning naming both."""
    from stitchbench.plugin.manager import _Loader
    from stitchbench.plugin.registration import RegistryEntry

    f = write_plugin(tmp_path / "lcka_plus.py", INDEX_PLUGIN.format(name="lcka_plus"))
    installed = write_plugin(tmp_path / "installed_copy.py", INDEX_PLUGIN.format(name="lcka_plus"))
    loader = _Loader()
    import importlib.util

    spec = importlib.util.spec_from_file_location("installed_copy_mod", installed)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    loader._register("lcka_plus", module, "entry point stitchbench-lcka-plus 1.0")
    with pytest.warns(UserWarning, match=r"lcka_plus.*registered path.*instead of.*entry point stitchbench-lcka-plus"):
        loader.add_registry_entry(RegistryEntry("lcka_plus", path=str(f)))
    result = loader.finish()
    assert result.infos["lcka_plus"].origin.startswith("registered path")
    assert result.modules["lcka_plus"].__file__ == str(f)


def test_wrong_type_and_forgotten_parentheses(workspace, tmp_path):
    f = write_plugin(tmp_path / "bad_type.py", """
        import stitchbench

        class NotAnIndex:
            name = "x"

        @stitchbench.hookimpl
        def register_similarity_indices(register):
            register(NotAnIndex())
    """)
    entry = stitchbench.plugin.registration.entry_for(str(f))
    with pytest.raises(PluginError, match=r"plugin bad_type: .*expected an instance of stitchbench.SimilarityIndex"):
        stitchbench.plugin.manager.load_single(entry)
    g = write_plugin(tmp_path / "no_parens.py", INDEX_PLUGIN.format(name="np_idx").replace(
        "register(MeanCosine())", "register(MeanCosine)"))
    with pytest.raises(PluginError, match=r"forgotten the `\(\)`"):
        stitchbench.plugin.manager.load_single(stitchbench.plugin.registration.entry_for(str(g)))


def test_misspelt_hook_is_reported_with_a_suggestion(workspace, tmp_path):
    f = write_plugin(tmp_path / "typo.py", INDEX_PLUGIN.format(name="typo_idx").replace(
        "def register_similarity_indices", "def register_similarity_index"))
    p = cli("plugins", "register", str(f), cwd=workspace)
    assert p.returncode == 2
    assert "register_similarity_index" in p.stderr and "did you mean register_similarity_indices" in p.stderr


def test_plugin_that_fails_to_import_is_skipped_with_a_warning(workspace, tmp_path):
    f = write_plugin(tmp_path / "broken_idx.py", "import does_not_exist_anywhere\n")
    (workspace / "registry").mkdir()
    (workspace / "registry" / "plugins.toml").write_text(f'[[plugin]]\nname = "broken_idx"\npath = "{f}"\n')
    p = cli("plugins", "list", cwd=workspace)
    assert p.returncode == 0
    assert "broken_idx" in p.stderr and "does_not_exist_anywhere" in p.stderr
    assert "lcka" in p.stdout
    # A run that needs it names the plugin and the cause.
    p = cli("run", "--plugin", "broken_idx", "--dry-run", cwd=workspace)
    assert p.returncode == 2
    assert "broken_idx" in p.stderr and "ModuleNotFoundError" in p.stderr and "Traceback" not in p.stderr


def test_registered_module_by_name(workspace, tmp_path, monkeypatch):
    pkg = tmp_path / "site"
    pkg.mkdir()
    write_plugin(pkg / "mylab_index.py", INDEX_PLUGIN.format(name="mylab_cos"))
    monkeypatch.syspath_prepend(str(pkg))
    entry = stitchbench.plugin.registration.entry_for("mylab_index")
    assert entry.module == "mylab_index"
    infos = stitchbench.plugin.manager.load_single(entry)
    assert [(i.name, i.kind, i.origin) for i in infos] == [("mylab_cos", "similarity_index", "registered module mylab_index")]


def test_each_hook_is_documented_with_its_signature():
    import inspect

    from stitchbench.plugin import hookspecs
    from stitchbench.plugin.types import HOOK_OF_KIND

    for hook in HOOK_OF_KIND.values():
        fn = getattr(hookspecs, hook)
        assert list(inspect.signature(fn).parameters) == ["register"]
        assert fn.__doc__ and "register(" in fn.__doc__


def test_plugin_loading_is_cached_per_workspace(workspace):
    assert load_plugins(workspace) is load_plugins(workspace)
