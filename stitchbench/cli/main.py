"""The ``stitchbench`` command line.

Kept light at import time (no torch): ``stitchbench --help`` and ``plugins list`` must be
fast. Usage errors exit with status 2 and a one-paragraph message, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import StitchbenchError, UsageError
from . import commands

log = logging.getLogger("stitchbench")

KIND_CHOICES = ("dataset", "architecture", "matcher", "similarity_index", "evaluation")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="stitchbench",
        description="Compare neural-network representations by model stitching (DM, TLM) and structural "
        "indices (LCKA, PWCCA, OPD, DM), with the checks of Balogh & Jelasity (AAAI 2025). Results go "
        "to MLflow (mlruns/ in the workspace, or $MLFLOW_TRACKING_URI).",
    )
    p.add_argument("--workspace", metavar="DIR", help="workspace directory (default: the current directory)")
    p.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    r = sub.add_parser("run", help="run a preset or config: train or reuse networks, fill matrices, evaluate")
    _config_args(r)
    r.add_argument("--plugin", action="append", default=[], metavar="NAME",
                   help="run only these matchers / indices / evaluations (repeatable), plus what they need; "
                   "a dataset or architecture name replaces the configured one")
    r.add_argument("--data-dir", metavar="DIR", help="where data sets on disk live")
    r.add_argument("--download", action="store_true", help="download a missing data set into --data-dir")
    r.add_argument("--device", choices=("cpu", "cuda", "auto"), help="device for every job")
    r.add_argument("--dry-run", action="store_true",
                   help="validate, resolve plugins, print the plan with its job count and a GPU-hour estimate, and exit")
    r.add_argument("--throughput", metavar="FILE",
                   help="with --dry-run: GPU throughputs measured by benchmarks/gpu_throughput.py --write FILE")
    r.add_argument("--executor", choices=("local", "ray"),
                   help='where jobs run: local (default: this process) or ray (Ray tasks; pip install -e ".[ray]")')
    r.add_argument("--ray-address", metavar="ADDR",
                   help="a running Ray cluster to use (e.g. auto); implies --executor ray (default: a local cluster)")
    r.add_argument("--no-reuse", nargs="?", const="all", action="append", default=[], metavar="KIND|NAME",
                   help="compute jobs again instead of reusing finished ones: all of them (no value), those of a "
                   "plugin kind (e.g. similarity_index) or of one plugin (e.g. lcka); repeatable")

    pl = sub.add_parser("plugins", help="list, register and unregister plugins")
    psub = pl.add_subparsers(dest="plugins_command", metavar="ACTION")
    psub.required = True
    ls = psub.add_parser("list", help="every plugin with its kind, origin and description")
    ls.add_argument("--kind", choices=KIND_CHOICES)
    ls.add_argument("--json", action="store_true", help="a JSON list of {name, kind, origin, description, ...}")
    reg = psub.add_parser("register", help="add a plugin file, package directory or module to registry/plugins.toml")
    reg.add_argument("target", metavar="PATH_OR_MODULE")
    unreg = psub.add_parser("unregister", help="remove a plugin from registry/plugins.toml")
    unreg.add_argument("name")
    chk = psub.add_parser("check", help="conformance checks of plugins on tiny synthetic inputs (all, or the named)")
    chk.add_argument("names", nargs="*", metavar="NAME")
    chk.add_argument("--kind", choices=KIND_CHOICES, help="only plugins of this kind")
    chk.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="params",
                     help="a parameter of the checked plugin (with one NAME), e.g. --set width=8")
    chk.add_argument("--json", action="store_true")
    new = psub.add_parser("new", help="write a plugin package skeleton (module, pyproject, test) to start from")
    new.add_argument("kind", choices=KIND_CHOICES)
    new.add_argument("name", help="the plugin's name (letters, digits, _; used as its package name too)")
    new.add_argument("--dir", metavar="DIR", help="where to create it (default: ./stitchbench-<name>)")

    sub.add_parser("presets", help="list the presets")

    cl = sub.add_parser("clean", help="delete this workspace's results (runs, artifacts, models, caches)")
    cl.add_argument("--dry-run", action="store_true", help="say what would be deleted, and delete nothing")
    cl.add_argument("--force", action="store_true", help="even while a run of this workspace seems to be running")

    c = sub.add_parser("config", help="print a resolved configuration")
    _config_args(c)
    c.add_argument("--format", choices=("yaml", "json"), default="yaml")

    rep = sub.add_parser("report", help="the paper-style tables of a finished run")
    rep.add_argument("run", nargs="?", default="latest", help="a parent run id, or `latest` (default)")
    rep.add_argument("--matrices", action="store_true",
                     help="also every matrix of the run (stitching and index matrices, reused ones included) as a "
                     "table of source layers x target layers; with --json under the key `matrices`")
    rep.add_argument("--json", action="store_true")

    ui = sub.add_parser("ui", help="start the MLflow UI on this workspace's store")
    ui.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    ui.add_argument("--port", type=int, default=5000)
    ui.add_argument("--workers", type=int, default=1,
                    help="server worker processes (default 1, enough for one user; MLflow's own default is 4)")

    cmp_ = sub.add_parser("compare", help="similarity indices between two saved activation arrays")
    cmp_.add_argument("a", metavar="A.npy")
    cmp_.add_argument("b", metavar="B.npy")
    cmp_.add_argument("--index", action="append", default=[], metavar="NAME", help="index name (repeatable; default all)")
    cmp_.add_argument("--param", action="append", default=[], metavar="NAME.KEY=VALUE",
                      help="a parameter of index NAME, the value read as YAML, e.g. --param pwcca.arrangement=pooled "
                      "(repeatable)")
    cmp_.add_argument("--json", action="store_true",
                      help="strict JSON: {a, b, results: [{index, value, higher_is_more_similar, params, error?}]}")
    return p


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help="a preset name (see `stitchbench presets`; default quick)")
    p.add_argument("--config", metavar="FILE", help="a YAML or TOML config, merged over the preset")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override one setting, e.g. --set networks.count=3 (repeatable)")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _setup_logging(args.verbose)
    if args.workspace:
        ws = Path(args.workspace).expanduser()
        if not ws.is_dir():
            return _fail(UsageError(f"--workspace {ws} is not a directory"))
        os.environ["STITCHBENCH_WORKSPACE"] = str(ws.resolve())
    handler = getattr(commands, f"cmd_{args.command}")
    # SIGTERM (a cluster pre-empting the job, `kill`) ends a run as Ctrl-C does: the runs
    # are marked KILLED, finished jobs stay reusable, exit status 130.
    previous = signal.signal(signal.SIGTERM, _sigterm)
    try:
        code = int(handler(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler below, not at exit
        return code
    except StitchbenchError as e:
        return _fail(e, args.verbose)
    except KeyboardInterrupt:
        print("stitchbench: interrupted; finished jobs are kept and will be reused by the same command",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # the reader went away (`stitchbench presets | head`): stop quietly, as `cat` does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:
        from ..store.runs import is_storage_error

        if not is_storage_error(e):
            raise
        from ..errors import StorageError

        return _fail(StorageError(None, e), args.verbose)
    finally:
        signal.signal(signal.SIGTERM, previous)


EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT) or SIGTERM: 128 + SIGINT, as shells report Ctrl-C


def _sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _fail(e: StitchbenchError, verbose: bool = False) -> int:
    if verbose and e.__cause__ is not None:  # where a plugin's or the core's code raised
        import traceback

        traceback.print_exception(e.__cause__, file=sys.stderr)
    print(f"stitchbench: error: {e}", file=sys.stderr)
    return e.exit_code


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("stitchbench").setLevel(logging.INFO)
    if not verbose:
        logging.getLogger("stitchbench").setLevel(logging.WARNING)

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"stitchbench: warning: {message}", file=sys.stderr)

    warnings.showwarning = show


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
