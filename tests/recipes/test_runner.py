"""Tests of koopman_hooks/recipes/runner.py."""

from __future__ import annotations

import json

import pytest
import torch

from koopman_hooks.cli import main
from koopman_hooks.data import YinYangDataset
from koopman_hooks.recipes import load_run

TINY = [
    "data.train_size=600", "data.test_size=300", "model.depth=2", "train.epochs=3",
    "probe.layers=['blocks.0','blocks.1']", "probe.epochs=2", "probe.steps=2", "probe.latent_dim=8",
    "topology.n_points=150", "topology.per_class=false", "report.pca_layers=['blocks.0','blocks.1']",
]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    overrides = [*TINY, "probe.samples=500", "unlearning.classes=[2]", "unlearning.baseline_classes=[2]",
                 "unlearning.methods=['endpoint']",
                 "unlearning.baselines=['original','leace_baseline']"]
    argv = ["run", "yinyang", "--out", str(out), "--quiet", "--seeds", "2"]
    for item in overrides:
        argv += ["--set", item]
    assert main(argv) == 0
    return out



def test_report_files_and_schema(tiny_run):
    report = json.loads((tiny_run / "report.json").read_text())
    assert report["recipe"] == "yinyang" and report["seeds"] == [0, 1]
    assert report["environment"]["threads"] == 1  # the recipe's threads, which the runs had
    fits = report["surrogate"]["fit"]  # one entry per seed: what each fit chose, never averaged
    assert [fit["seed"] for fit in fits] == [0, 1]
    for fit in fits:
        assert fit["fit_samples"] + fit["held_out_samples"] == 500  # probe.samples of the 600 training rows
        assert isinstance(fit["kept_epoch"], int) and isinstance(fit["stopped_because"], str)
    for key in ("test_accuracy", "per_class_accuracy"):
        assert key in report["model"]
    for key in ("test_accuracy", "agreement", "per_class_accuracy", "state_fvu", "fit_seconds", "peak_rss_mb"):
        assert key in report["surrogate"]
    for key in ("test_accuracy", "agreement", "state_fvu"):
        assert key in report["linear_baseline"]
    spread = report["spread"]["surrogate.agreement"]
    assert spread["min"] <= spread["mean"] <= spread["max"] and len(spread["values"]) == 2
    assert len(report["model"]["per_class_accuracy"]) == 3
    for key in ("epsilon", "network_betti0", "network_betti1", "surrogate_betti0", "surrogate_betti1",
                "spearman_network", "spearman_surrogate"):
        assert key in report["topology"]
    assert len(report["topology"]["surrogate_betti0"]) == 3  # steps 0..2
    rows = report["unlearning"]["rows"]
    assert {r["method"] for r in rows} == {"koopman_endpoint", "original", "leace_baseline"}
    for row in rows:
        for key in ("method", "forget_class", "test_forget_accuracy", "test_retain_accuracy", "train_forget_accuracy",
                    "train_retain_accuracy", "mia_efficacy", "probe_recall", "seconds"):
            assert key in row
    assert {t["figure"] for t in report["targets"]} >= {"surrogate.agreement", "model.test_accuracy"}
    md = (tiny_run / "report.md").read_text()
    assert "## Fidelity" in md and "## Topology" in md and "## Unlearning" in md and "## Wall time" in md
    for path in report["plots"].values():
        assert (tiny_run / path).exists()
    assert (tiny_run / "seed0" / "probe.safetensors").exists()



def test_a_run_reloads_as_model_and_probe(tiny_run):
    model, probe = load_run(tiny_run / "seed0")
    assert not model.training
    x = YinYangDataset(256, seed=5).inputs
    with torch.no_grad():
        logits = model(x)
        patched = probe.patch()(x)
    # the reloaded pair is the run's: its surrogate agrees with its model as the report says
    agreement = (logits.argmax(1) == patched.argmax(1)).float().mean().item()
    report = json.loads((tiny_run / "report.json").read_text())
    assert agreement >= report["surrogate"]["agreement"] - 0.1
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_run(tiny_run)  # the run directory, not a seed directory



def test_probe_topology_per_class_on_knn_graphs(tiny_run):
    _, probe = load_run(tiny_run / "seed0")
    data = YinYangDataset(300, seed=7)
    loader = [(data.inputs[i : i + 100], data.targets[i : i + 100]) for i in range(0, 300, 100)]
    topo = probe.topology(loader, n_points=300, dims=(0,), per_class=True, metric="knn", n_neighbors=8)
    assert topo["metric"] == "knn" and topo["epsilon"] == 1.0 and topo["count"] == "sum over classes"
    for name in ("network", "surrogate"):
        per_class = [topo["per_class"][c][name]["betti0"] for c in ("0", "1", "2")]
        assert topo[f"{name}_betti0"] == [sum(v) for v in zip(*per_class)]
        assert len(topo[f"{name}_betti0_pooled"]) == len(topo[f"{name}_betti0"])
        assert all(b >= 3 for b in topo[f"{name}_betti0"])  # at least one component per class
    assert topo["network_betti1"] is None




def test_surrogate_steps_that_stand_for_layers_are_seen_in_their_layers_dimension(tiny_run):
    _, probe = load_run(tiny_run / "seed0")
    data = YinYangDataset(300, seed=7)
    loader = [(data.inputs[i : i + 100], data.targets[i : i + 100]) for i in range(0, 300, 100)]
    fitted = probe.fetch_model()
    topo = probe.topology(loader, n_points=300, dims=(0,), variance=0.9)
    network, surrogate = topo["lens_dims"]["network"], topo["lens_dims"]["surrogate"]
    assert len(network) == len(fitted.layers) and len(surrogate) == fitted.autoencoder.offsets[-1] + 1
    for i, step in enumerate(fitted.autoencoder.offsets):  # probed layer i is the surrogate's step at offset i
        assert surrogate[step] == network[i]
    assert probe.topology(loader, n_points=300, dims=(0,))["lens_dims"] is None  # no lens without variance=


def test_topology_takes_one_glob_string_like_a_list_of_one(tiny_run):
    _, probe = load_run(tiny_run / "seed0")
    data = YinYangDataset(200, seed=8)
    loader = [(data.inputs[i : i + 100], data.targets[i : i + 100]) for i in range(0, 200, 100)]
    one = probe.topology(loader, n_points=200, dims=(0,), layers="blocks.*")
    listed = probe.topology(loader, n_points=200, dims=(0,), layers=["blocks.*"])
    blocks = [name for name, _ in probe.fetch_model().model.named_modules() if name.count(".") == 1
              and name.startswith("blocks.")]
    assert len(blocks) >= 2 and one["network_layers"] == listed["network_layers"] == blocks
    assert one["network_betti0"] == listed["network_betti0"]


def test_the_report_flags_a_strict_vs_mixed_gap():
    from koopman_hooks.recipes.sections.fidelity import honesty_lines

    base = {"surrogate": {"reduce": {"a": "flatten", "b": "cls"}}}
    quiet = honesty_lines({**base, "per_seed_honesty": [{"seed": 0, "agreement": 0.99, "mixed_agreement": 0.99,
                                                         "strict_mixed_gap": 0.0, "lossy_reduction_reaches_output": False}]})
    assert "`b` cls" in quiet[0] and not any("Flag" in line for line in quiet)
    for honesty in ({"strict_mixed_gap": 0.02, "lossy_reduction_reaches_output": False},
                    {"strict_mixed_gap": 0.0, "lossy_reduction_reaches_output": True}):
        lines = honesty_lines({**base, "per_seed_honesty": [{"seed": 3, "agreement": 0.9, "mixed_agreement": 0.92,
                                                             **honesty}]})
        assert any("**Flag" in line and "seed 3: strict 0.9000 vs mixed 0.9200" in line for line in lines)


TOKENS_TINY = [
    "data.train_size=400", "data.test_size=200", "model.num_layers=2", "train.epochs=4",
    "probe.layers=['transformer.h.0','transformer.h.1']", "probe.epochs=2",
    "report.pca_layers=['transformer.h.0','transformer.h.1']", "topology.n_points=100", "topology.per_class=false",
    "unlearning.classes=[1]", "unlearning.baseline_classes=[1]", "unlearning.baselines=['original','retrain']",
    "unlearning.eval_train_samples=400",
]


def test_a_token_recipe_runs_on_dict_batches_end_to_end(tmp_path):
    pytest.importorskip("transformers")
    argv = ["run", "tokens_gpt2", "--out", str(tmp_path), "--quiet"]
    # the edits' statistics (and the refinement's sample: token ids and masks) from the fit's cache
    for item in [*TOKENS_TINY, "unlearning.statistics_from='fit_cache'"]:
        argv += ["--set", item]
    assert main(argv) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    surrogate = report["surrogate"]
    assert surrogate["reduce"] == {"transformer.h.0": "flatten", "transformer.h.1": "last"}
    assert surrogate["mixed_agreement"] == surrogate["agreement"] and surrogate["lossy_reduction_reaches_output"] is False
    assert report["per_seed_honesty"][0]["strict_mixed_gap"] == 0.0
    assert {r["method"] for r in report["unlearning"]["rows"]} == {"koopman_endpoint", "original", "retrain"}
    assert len(report["topology"]["network_betti0"]) == 2
    md = (tmp_path / "report.md").read_text()
    assert "Reductions: `transformer.h.0` flatten, `transformer.h.1` last" in md and "**Flag" not in md
    model, probe = load_run(tmp_path / "seed0")
    assert type(model).__name__ == "GPT2ForSequenceClassification" and probe.layers == ["transformer.h.0", "transformer.h.1"]


def test_report_splits_the_wall_time_and_gives_latent_fvu_per_layer(tiny_run):
    report = json.loads((tiny_run / "report.json").read_text())
    parts = ("setup", "model_training", "probe_fit", "fidelity", "topology", "unlearning")
    for key in ("wall_time", "cpu_time"):
        split = report[key]
        assert all(split[part] >= 0 for part in parts)
        assert sum(split[part] for part in parts) <= split["total"] + 1e-6
        assert set(split["unlearning_parts"]) == {"koopman_statistics", "koopman_edits", "leace_baseline", "scoring"}
        assert sum(split["unlearning_parts"].values()) <= split["unlearning"] + 1e-6
    assert report["wall_time"]["total"] == pytest.approx(report["seconds"])
    assert report["wall_time"]["model_training"] == pytest.approx(report["model"]["train_seconds"], rel=0.05, abs=0.05)
    surrogate = report["surrogate"]
    assert set(surrogate["latent_fvu_per_layer"]) == set(surrogate["state_fvu_per_layer"]) == {"blocks.1"}
    assert surrogate["latent_fvu_per_layer"]["blocks.1"] == pytest.approx(surrogate["latent_fvu"])
    assert "surrogate.latent_fvu_per_layer.blocks.1" in report["spread"]
    md = (tiny_run / "report.md").read_text()
    assert "| layer | state FVU | latent FVU |" in md and "| `blocks.1` |" in md
    assert "| part | wall s | share | CPU s |" in md and "↳ LEACE baseline" in md


def test_a_recipes_threads_bound_torch_and_the_blas_pools_and_are_restored():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    from koopman_hooks.recipes.runner import limited_threads

    original = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        before = [(p["internal_api"], p["num_threads"]) for p in threadpoolctl.threadpool_info()]
        with limited_threads(1):
            assert torch.get_num_threads() == 1
            assert all(p["num_threads"] == 1 for p in threadpoolctl.threadpool_info())
        assert torch.get_num_threads() == 2
        assert [(p["internal_api"], p["num_threads"]) for p in threadpoolctl.threadpool_info()] == before
        with pytest.raises(RuntimeError, match="boom"), limited_threads(1):
            raise RuntimeError("boom")
        assert torch.get_num_threads() == 2
        with limited_threads(None):
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(original)
