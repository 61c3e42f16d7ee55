"""Runnable experiments: recipe files (shipped in ``library/``), the runner, reports and plots."""

from koopman_hooks.recipes.config import Recipe, load_recipe, parse_recipe
from koopman_hooks.recipes.runner import check_recipe, load_run, run_recipe

__all__ = ["Recipe", "check_recipe", "load_recipe", "load_run", "parse_recipe", "run_recipe"]
