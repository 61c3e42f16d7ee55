"""Command line: ``koopman-hooks run RECIPE --out DIR [--seeds N]``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from koopman_hooks.data import DATA_ENV_VAR


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="koopman-hooks", description="Koopman autoencoder probes for PyTorch models.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a recipe end to end and write report.json, report.md and plots")
    run.add_argument("recipe", help="a recipe TOML file (e.g. recipes/yinyang.toml) or a bundled name (yinyang)")
    run.add_argument("--out", default=None, help="output folder (default: runs/<recipe name>)")
    run.add_argument("--seeds", type=int, default=1, help="repeat the whole recipe with seeds 0..N-1 (default 1)")
    run.add_argument("--data-root", default=None, help=f"folder holding datasets (default: ${DATA_ENV_VAR} or ./data)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                     help="override a recipe value, e.g. --set probe.epochs=5 (repeatable)")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from koopman_hooks.data import MissingDataError
    from koopman_hooks.recipes import load_recipe, run_recipe

    if args.seeds < 1:
        print("koopman-hooks: --seeds must be at least 1", file=sys.stderr)
        return 2
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        out = args.out or f"runs/{recipe['name']}"
        report = run_recipe(recipe, out, seeds=range(args.seeds), data_root=args.data_root, verbose=not args.quiet)
    except (FileNotFoundError, MissingDataError, ValueError) as err:
        print(f"koopman-hooks: {err}", file=sys.stderr)
        return 2
    summary = {k: report[k] for k in ("model", "surrogate", "linear_baseline")}
    for section in summary.values():
        for key in [k for k in section if isinstance(section[k], (list, dict))]:
            section.pop(key)
    print(json.dumps({"recipe": report["recipe"], "seeds": report["seeds"], **summary}, indent=2))
    failed = [t["figure"] for t in report["targets"] if not t["met"]]
    print(f"report: {out}/report.md" + (f" (targets missed: {', '.join(failed)})" if failed else ""))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
