"""Command line: ``koopman-hooks run RECIPE --out DIR`` and ``koopman-hooks validate RECIPE``.

A user mistake (a bad recipe, option, path or data root) prints one line
``koopman-hooks: ...`` and exits with status 2, before any model is trained. Launched by
``torchrun --nproc_per_node=N -m koopman_hooks run ...``, every rank fits on its shard of the
recipe's data (gloo on CPU, NCCL on GPUs) and rank 0 writes the report.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from koopman_hooks.data import DATA_ENV_VAR, MissingDataError
from koopman_hooks.errors import ConfigError, IncompatibleFileError, LayerError

USER_ERRORS = (ConfigError, LayerError, IncompatibleFileError, MissingDataError, FileNotFoundError, NotADirectoryError)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="koopman-hooks", description="Koopman autoencoder probes for PyTorch models.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a recipe end to end and write report.json, report.md and plots")
    validate = sub.add_parser("validate", help="check a recipe and print it resolved, or its errors")
    for command in (run, validate):
        command.add_argument("recipe", help="a recipe TOML file or a packaged recipe's name (yinyang, mnist, ...)")
        command.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                             help="override a recipe value, e.g. --set probe.epochs=5 (repeatable)")
    run.add_argument("--out", default=None, help="output folder, created if missing (default: runs/<recipe name>)")
    run.add_argument("--seeds", type=int, default=1, help="repeat the whole recipe with seeds 0..N-1 (default 1)")
    run.add_argument("--data-root", default=None, help=f"folder holding datasets (default: ${DATA_ENV_VAR} or ./data)")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def _fail(message: str) -> int:
    print(f"koopman-hooks: {message}", file=sys.stderr)
    return 2


def _start_process_group() -> bool:
    """Join the process group torchrun describes in the environment (``WORLD_SIZE`` > 1)."""
    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    started = _start_process_group()
    try:
        return _main(args)
    finally:
        if started:
            import torch.distributed as dist

            dist.destroy_process_group()


def _main(args: argparse.Namespace) -> int:
    from koopman_hooks.core.schema import to_mapping
    from koopman_hooks.recipes import check_recipe, load_recipe, run_recipe

    try:
        recipe = load_recipe(args.recipe, args.overrides)
        if args.command == "validate":
            check_recipe(recipe)
            print(json.dumps(to_mapping(recipe), indent=2))
            return 0
        if args.seeds < 1:
            return _fail("--seeds must be at least 1")
        out = Path(args.out or f"runs/{recipe.name}")  # checked and created by run_recipe, after the recipe
        report = run_recipe(recipe, out, seeds=range(args.seeds), data_root=args.data_root, verbose=not args.quiet)
    except USER_ERRORS as err:
        return _fail(str(err))
    if not report:  # a rank other than 0 under torchrun: rank 0 reports
        return 0
    summary = {k: dict(report[k]) for k in ("model", "surrogate", "linear_baseline")}
    for section in summary.values():
        for key in [k for k in section if isinstance(section[k], (list, dict))]:
            section.pop(key)
    print(json.dumps({"recipe": report["recipe"], "seeds": report["seeds"], **summary}, indent=2))
    failed = [t["figure"] for t in report["targets"] if not t["met"]]
    print(f"report: {out}/report.md" + (f" (targets missed: {', '.join(failed)})" if failed else ""))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
