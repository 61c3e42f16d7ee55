"""Streaming statistics, fidelity scores and small linear algebra, each checked against a closed form."""

from koopman_hooks.maths.linalg import (
    apply_homogeneous,
    gaussian_ot_map,
    homogeneous,
    polar,
    psd_power,
    psd_sqrt,
    real_matrix_root,
    solve_spd,
)
from koopman_hooks.maths.scores import ClassificationCounts, StreamingFVU
from koopman_hooks.maths.stats import JointMoments, StreamingMoments, ridge_regression

__all__ = [
    "ClassificationCounts",
    "JointMoments",
    "StreamingFVU",
    "StreamingMoments",
    "apply_homogeneous",
    "gaussian_ot_map",
    "homogeneous",
    "polar",
    "psd_power",
    "psd_sqrt",
    "real_matrix_root",
    "ridge_regression",
    "solve_spd",
]
