"""``stitchbench plugins check``: the conformance checks of `stitchbench.testing`, on
every plugin (or the named ones), with a line per plugin and exit status 1 if any fails."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from ..errors import UsageError


def check_plugins(args: argparse.Namespace, ws: Path) -> int:
    from ..plugin.manager import load_plugins
    from ..run.config import apply_override, format_validation_error

    plugins = load_plugins(ws)
    names = list(args.names) or [n for n in plugins.infos if args.kind is None or plugins.infos[n].kind == args.kind]
    for n in args.names:
        plugins.get(n, args.kind)  # unknown: a usage error listing the known names
    params: dict[str, Any] | None = None
    if args.params:
        if len(names) != 1:
            raise UsageError("--set gives params of one plugin: name exactly one plugin to check")
        raw: dict[str, Any] = {}
        for assignment in args.params:
            apply_override(raw, assignment)
        from pydantic import ValidationError

        try:
            params = plugins.objects[names[0]].Params.model_validate(raw)
        except ValidationError as e:
            raise UsageError(f"invalid params for {names[0]}:\n" + format_validation_error(e, f"{names[0]}.")) from None

    from ..testing.checks import run_checks

    results = []
    for name in names:
        start = time.perf_counter()
        r = run_checks(plugins.objects[name], params, plugins=plugins)
        seconds = time.perf_counter() - start
        results.append({"name": name, "kind": r.kind, "ok": r.ok, "checks": r.checks, "problems": r.problems,
                        "seconds": round(seconds, 2), "code": plugins.code_identity(name)})
        if not args.json:
            status = "ok  " if r.ok else "FAIL"
            print(f"{status} {name:22} {r.kind:16} {seconds:5.1f} s  {', '.join(r.checks) if r.ok else ''}".rstrip())
            for p in r.problems:
                print(f"       - {p}")
    for b in plugins.broken:
        if not args.names or b.plugin in args.names:
            results.append({"name": b.plugin, "kind": None, "ok": False, "checks": [],
                            "problems": [f"failed to load ({b.origin}): {b.error}"], "seconds": 0.0})
            if not args.json:
                print(f"FAIL {b.plugin:22} {'(not loaded)':16}          - failed to load ({b.origin}): {b.error}")
    failed = [r["name"] for r in results if not r["ok"]]
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(f"\n{len(results) - len(failed)} of {len(results)} plugin(s) pass"
              + (f"; failing: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0
