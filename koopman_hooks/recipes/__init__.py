"""Runnable experiments: recipe files, the runner, reports and plots."""

from koopman_hooks.recipes.config import load_recipe
from koopman_hooks.recipes.runner import load_run, run_recipe

__all__ = ["load_recipe", "load_run", "run_recipe"]
