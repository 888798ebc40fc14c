"""The commands of the ``stitchbench`` command line, one ``cmd_<name>(args)`` each.

Heavy imports (torch, MLflow) happen inside the commands that need them."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from ..errors import StitchbenchError, UsageError
from .maintenance import cmd_clean  # noqa: F401 - a command, found by name


def _dry_run(cfg: Any, plugins: Any, args: argparse.Namespace, ws: Path) -> int:
    """The plan, made without reading the data, and its compute estimate."""
    from ..run.estimate import estimate, load_throughputs
    from ..run.plan import make_plan

    throughputs = load_throughputs(args.throughput)
    plan = make_plan(cfg, plugins, selected=args.plugin, workspace=ws, load_data=False, no_reuse=args.no_reuse)
    print(plan.describe())
    if plan.info is None:
        print(f"estimate:   not available (dataset plugin {plan.dataset.name!r} cannot describe its data "
              "without loading it)")
    else:
        print(estimate(plan, plan.info, throughputs).describe())
    if getattr(plan.dataset.obj, "needs_data_dir", False) and not cfg.data_dir:
        print("needs:      --data-dir DIR to run (the data set is read from disk)")
    if "gpu" in cfg.requires:
        print("needs:      a GPU to run in reasonable time (--device cuda)")
    return 0


def _workspace() -> Path:
    from ..workspace import current_workspace

    return current_workspace()


# -- commands -----------------------------------------------------------------------------


def _build_config(args: argparse.Namespace, extra: dict[str, Any] | None = None):
    from ..run.config import build_config

    return build_config(args.preset, args.config, args.overrides, extra)


def cmd_run(args: argparse.Namespace) -> int:
    from ..plugin.manager import load_plugins
    from ..run.plan import make_plan

    extra: dict[str, Any] = {}
    if args.data_dir:
        extra["data_dir"] = args.data_dir
    if args.download:
        extra["download"] = True
    if args.device:
        extra["device"] = args.device
    if args.ray_address and args.executor == "local":
        raise UsageError("--ray-address is for --executor ray")
    if args.executor or args.ray_address:
        extra["executor"] = {"name": args.executor or "ray"}
        if args.ray_address:
            extra["executor"]["ray_address"] = args.ray_address
    ws = _workspace()
    plugins = load_plugins(ws)
    # `--plugin` naming a data set or an architecture replaces the configured one before
    # `--set` applies, so `--plugin mycnn --set networks.architecture.params.width=8` sets
    # mycnn's width (and resnet18's params do not follow it to mycnn).
    for name in args.plugin:
        info = plugins.infos.get(name)
        if info is not None and info.kind == "dataset":
            extra["dataset"] = {"name": name}
        elif info is not None and info.kind == "architecture":
            extra["networks"] = {"architecture": {"name": name}}
    cfg = _build_config(args, extra)
    if args.dry_run:
        return _dry_run(cfg, plugins, args, ws)
    if args.throughput:
        raise UsageError("--throughput is for --dry-run (it only changes the estimate)")
    plan = make_plan(cfg, plugins, selected=args.plugin, workspace=ws, no_reuse=args.no_reuse)
    from ..run.pipeline import execute

    result = execute(plan, plugins, ws)
    print(f"run {result.run_id} finished (experiment {plan.config.name!r}): "
          f"networks trained {len(result.trained)}, reused {len(result.reused_networks)}; "
          f"matrix jobs computed {result.computed_jobs}, reused {result.reused_jobs}")
    for text in result.report_texts:
        print()
        print(text.rstrip())
    print(f"\nbrowse: stitchbench ui   |   tables: stitchbench report {result.run_id}")
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    from ..plugin import manager as pm
    from ..plugin.registration import entry_for, read_entries, write_entries

    ws = _workspace()
    if args.plugins_command == "list":
        infos = pm.list_plugins(args.kind, ws)
        broken = pm.load_plugins(ws).broken
        if args.json:
            print(json.dumps([i.as_dict() for i in infos], indent=2))
            return 0
        if not infos:
            print("no plugins" + (f" of kind {args.kind}" if args.kind else ""))
        wn = max([len(i.name) for i in infos] + [4])
        wk = max([len(i.kind) for i in infos] + [4])
        wo = max([len(i.origin) for i in infos] + [6])
        print(f"{'NAME':{wn}}  {'KIND':{wk}}  {'ORIGIN':{wo}}  DESCRIPTION")
        for i in infos:
            print(f"{i.name:{wn}}  {i.kind:{wk}}  {i.origin:{wo}}  {i.description}")
        # Where the code that a run would execute lives.
        bundled = sorted({str(Path(i.location).parent.parent) for i in infos if i.origin == "bundled" and i.location})
        if bundled:
            print(f"\nbundled plugins: {', '.join(bundled)} (distribution stitchbench)")
        for i in infos:
            if i.origin != "bundled":
                print(f"{i.name}: {i.location or '?'} ({i.origin})")
        for b in broken:
            print(f"\nskipped {b.plugin} ({b.origin}): {b.error}", file=sys.stderr)
        return 0
    if args.plugins_command == "register":
        entry = entry_for(args.target)
        entries = read_entries(ws)
        if any(e.name == entry.name for e in entries):
            raise UsageError(f"a plugin named {entry.name!r} is already registered; "
                             f"`stitchbench plugins unregister {entry.name}` first")
        registered = pm.load_single(entry)
        # It must not clash with what is already installed.
        current = pm.load_plugins(ws)
        for info in registered:
            if info.name in current.infos:
                other = current.infos[info.name]
                raise UsageError(
                    f"plugin {entry.name} ({entry.origin}) registers the name {info.name!r} (a {info.kind}), which "
                    f"plugin {other.plugin} ({other.origin}) already registers; rename it in your plugin"
                )
        f = write_entries([*entries, entry], ws)
        pm.clear_cache()
        print(f"registered {entry.name} ({entry.origin}) in {f}: " +
              ", ".join(f"{i.name} ({i.kind})" for i in registered))
        return 0
    if args.plugins_command == "unregister":
        entries = read_entries(ws)
        keep = [e for e in entries if e.name != args.name]
        if len(keep) == len(entries):
            # also accept the name of an object the plugin registers
            try:
                owner = pm.load_plugins(ws).infos.get(args.name)
            except StitchbenchError:
                owner = None
            keep = [e for e in entries if not (owner and e.name == owner.plugin)]
        if len(keep) == len(entries):
            names = ", ".join(e.name for e in entries) or "(none)"
            raise UsageError(f"no registered plugin called {args.name!r}; registered: {names}. "
                             "Bundled and entry-point plugins are removed by uninstalling their package.")
        f = write_entries(keep, ws)
        pm.clear_cache()
        print(f"unregistered {args.name} from {f}")
        return 0
    if args.plugins_command == "check":
        from .plugin_tools import check_plugins

        return check_plugins(args, ws)
    if args.plugins_command == "new":
        from .scaffold import new_plugin

        return new_plugin(args)
    raise UsageError(f"unknown plugins action {args.plugins_command}")


def cmd_presets(args: argparse.Namespace) -> int:
    from ..run.config import preset_names, preset_summary

    names = preset_names()
    w = max(len(n) for n in names)
    for n in names:
        print(f"{n:{w}}  {preset_summary(n)}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from ..run.config import config_json

    cfg = _build_config(args)
    if args.format == "json":
        print(config_json(cfg))
    else:
        import yaml

        print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False).rstrip())
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from ..store.connection import connect
    from ..store.report import build_matrices, build_report, format_matrices, format_report, resolve_run

    client = connect(_workspace())
    run = resolve_run(client, args.run)
    report = build_report(client, run)
    if args.matrices:
        report["matrices"] = build_matrices(client, run)
    if args.json:
        out = {k: v for k, v in report.items() if not k.startswith("_")}
        print(json.dumps(out, indent=2, sort_keys=False, default=str))
    else:
        print(format_report(report), end="")
        if args.matrices:
            print("\nmatrices (rows: source layers, columns: target layers)\n")
            print(format_matrices(report["matrices"]), end="")
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    import shutil
    import subprocess

    from ..store import connection
    from ..store.jobs import all_experiment_ids
    from ..store.tags import TAG_KIND

    ws = _workspace()
    uri = connection.tracking_uri(ws)
    client = connection.connect(ws)  # creates a local store if needed, so the UI starts on a valid one
    # MLflow 3's UI opens in its GenAI view unless told otherwise: link to the newest
    # stitchbench experiment in the model-training view.
    path = "#/experiments"
    ids = all_experiment_ids(client)
    latest = client.search_runs(ids, filter_string=f"tags.`{TAG_KIND}` = 'parent'",
                                order_by=["attributes.start_time DESC"], max_results=1) if ids else []
    if latest:
        path = f"#/experiments/{latest[0].info.experiment_id}"
    host = f"[{args.host}]" if ":" in args.host else args.host
    url = f"http://{host}:{args.port}/{path}?workflowType=machine_learning"
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"stitchbench: warning: the MLflow UI has no authentication; binding to {args.host} lets anyone "
              "who can reach this machine read and change your runs", file=sys.stderr)
    exe = shutil.which("mlflow") or str(Path(sys.executable).with_name("mlflow"))
    if args.workers < 1:
        raise UsageError(f"--workers {args.workers}: give at least 1 worker process")
    cmd = [exe, "ui", "--backend-store-uri", uri, "--host", args.host, "--port", str(args.port),
           "--workers", str(args.workers)]
    if connection.is_local_store(uri):
        cmd += ["--default-artifact-root", (ws / "mlruns" / "artifacts").as_uri()]
    print(f"MLflow UI on {url}\n  (store {uri}; Ctrl-C stops it)", file=sys.stderr)
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY=os.environ.get("MLFLOW_DISABLE_TELEMETRY", "true"))
    return subprocess.call(cmd, env=env)


def cmd_compare(args: argparse.Namespace) -> int:
    """Every chosen index of two saved activation arrays. A bad file, name or ``--param`` is
    a usage error (exit 2); an index whose code fails (raises, or returns a NaN) gets that
    error in its row instead of a value, the others are still computed, and the exit
    status is 1."""
    import numpy as np

    from ..plugin.manager import load_plugins
    from ..run.boundary import index_value

    assignments = _compare_param_assignments(args.param)
    arrays = []
    for p in (args.a, args.b):
        path = Path(p)
        if not path.exists():
            raise UsageError(f"{p} does not exist")
        try:
            arrays.append(np.load(path, allow_pickle=False))
        except Exception as e:  # noqa: BLE001
            raise UsageError(f"{p} is not a readable .npy array ({type(e).__name__}: {e})") from None
    a, b = arrays
    if a.ndim not in (2, 3, 4) or b.ndim not in (2, 3, 4):
        raise UsageError(f"arrays must be (n, p), (n, T, D) or (n, C, H, W); got shapes {a.shape} and {b.shape}")
    if a.shape[0] != b.shape[0]:
        raise UsageError(f"the arrays have different numbers of examples (rows): {a.shape[0]} in {args.a}, "
                         f"{b.shape[0]} in {args.b}; rows must be the same examples in the same order")
    plugins = load_plugins(_workspace())
    names = list(dict.fromkeys(args.index)) or plugins.names("similarity_index")
    indices = {name: plugins.get(name, "similarity_index") for name in names}
    for name, (_, flag) in assignments.items():
        if name in indices:
            continue
        try:
            plugins.get(name, "similarity_index")
        except UsageError as e:
            raise UsageError(f"{flag[0]}: {e}") from None
        raise UsageError(f"{flag[0]}: index {name!r} is not being compared (--index "
                         f"{' --index '.join(names)}); add --index {name} or drop the --param")
    params = {name: _compare_params(idx, *assignments.get(name, ({}, []))) for name, idx in indices.items()}
    rows = []
    for name, idx in indices.items():
        row: dict[str, Any] = {"index": name, "value": None,
                               "higher_is_more_similar": bool(idx.higher_is_more_similar),
                               "params": params[name].model_dump(mode="json")}
        try:
            row["value"] = index_value(idx, a, b, params[name])
        except Exception as e:  # noqa: BLE001 - a plugin's failure is its row's result, never a traceback
            row["error"] = _one_line_error(e)
        rows.append(row)
    if args.json:
        print(json.dumps({"a": {"path": args.a, "shape": list(a.shape)}, "b": {"path": args.b, "shape": list(b.shape)},
                          "results": rows}, indent=2, allow_nan=False))
    else:
        print(f"A {args.a} {a.shape}   B {args.b} {b.shape}")
        for r in rows:
            sense = "higher = more similar" if r["higher_is_more_similar"] else "distance: lower = more similar"
            val = f"{r['value']:.6f}" if r["value"] is not None else "failed"
            print(f"  {r['index']:10} {val:>12}   ({sense})")
    failed = [r for r in rows if r["value"] is None]
    for r in failed:
        print(f"stitchbench: error: index {r['index']} failed: {r['error']}", file=sys.stderr)
    return 1 if failed else 0


def _compare_param_assignments(assignments: list[str]) -> dict[str, tuple[dict[str, Any], list[str]]]:
    """``--param NAME.KEY=VALUE`` flags grouped by index NAME: the raw (unvalidated)
    parameters, nested along dotted keys and parsed as ``--set`` parses them
    (`apply_override`), and the flags that gave them (for messages)."""
    from ..run.config import apply_override

    raw: dict[str, Any] = {}
    flags: dict[str, list[str]] = {}
    for assignment in assignments:
        flag = f"--param {assignment}"
        key, sep, _ = assignment.partition("=")
        parts = [p.strip() for p in key.split(".")]
        if not sep or len(parts) < 2 or not all(parts):
            raise UsageError(f"{flag}: expected NAME.KEY=VALUE (an index name, one of its parameters and a value), "
                             "e.g. --param pwcca.arrangement=pooled")
        try:
            apply_override(raw, assignment)
        except UsageError as e:
            raise UsageError(f"{flag}: {str(e).split(': ', 1)[-1]}") from None
        flags.setdefault(parts[0], []).append(flag)
    return {name: (raw[name], flags[name]) for name in flags}


def _compare_params(index: Any, raw: dict[str, Any], flags: list[str]) -> Any:
    """``raw`` validated by the index's ``Params`` (its defaults where not given); a
    ConfigError naming the index and every bad key."""
    from pydantic import ValidationError

    from ..errors import ConfigError
    from ..run.config import format_validation_error

    try:
        return index.Params.model_validate(raw)
    except ValidationError as e:
        given = f" (from {', '.join(flags)})" if flags else " (its defaults; give them with --param)"
        raise ConfigError(f"invalid parameters for similarity index {index.name!r}{given}:\n"
                          + format_validation_error(e, prefix=f"{index.name}.")) from None


def _one_line_error(e: BaseException) -> str:
    """``<ExceptionType>: <message>`` on one line (a plugin's multi-line message joined)."""
    message = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    return f"{type(e).__name__}: {message}" if message else type(e).__name__
