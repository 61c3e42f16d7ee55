"""HuggingFace BERT and GPT-2 classifiers (built from configs, nothing downloaded) on the synthetic
token task, probed with dict batches ``{"input_ids", "attention_mask", "labels"}``: fit,
evaluate, patch, save/load, unlearn, topology and the baselines, with the defaults."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

pytest.importorskip("transformers")

from koopman_hooks import KoopmanProbe, PatchedModel
from koopman_hooks.data import TensorLoader, TokenSequenceDataset
from koopman_hooks.text import bert_classifier, gpt2_classifier
from koopman_hooks.training import predict, train_classifier
from koopman_hooks.unlearning import finetune, layer_batches, leace_erasure, neggrad_plus, retrain

LAYERS = {"bert": ["bert.encoder.layer.0", "bert.encoder.layer.1"], "gpt2": ["transformer.h.0", "transformer.h.1"]}
BUILD = {"bert": bert_classifier, "gpt2": gpt2_classifier}
HEAD = {"bert": "cls", "gpt2": "last"}


@pytest.fixture(scope="module")
def data() -> dict[str, TokenSequenceDataset]:
    return {"train": TokenSequenceDataset(2000, seed=0), "test": TokenSequenceDataset(600, seed=1)}


def loader(dataset: TokenSequenceDataset, batch_size: int = 500, shuffle: bool = False) -> TensorLoader:
    return TensorLoader.from_dataset(dataset, batch_size, shuffle=shuffle)


@pytest.fixture(scope="module")
def fits(data: dict[str, TokenSequenceDataset]) -> dict[str, dict]:
    """Per kind, on first use: a 2-layer model trained for a few seconds (~99% test accuracy) and a
    probe with the defaults (layers and label_key; a short fit)."""

    class Fits(dict):
        def __missing__(self, kind: str) -> dict:
            torch.manual_seed(0)
            model = BUILD[kind](4)
            train_classifier(model, loader(data["train"], 64, shuffle=True), 6, lr=3e-3, verbose=False)
            probe = KoopmanProbe(model, LAYERS[kind], label_key="labels", verbose=False)
            probe.fit(loader(data["train"]), epochs=8)
            self[kind] = {"kind": kind, "model": model, "probe": probe}
            return self[kind]

    return Fits()


@pytest.fixture(params=["bert", "gpt2"])
def fitted(request: pytest.FixtureRequest, fits: dict[str, dict]) -> dict:
    return fits[request.param]


def test_defaults_follow_the_head_and_flatten_the_rest(fitted):
    fit = fitted["probe"].fetch_model()
    first, last = fit.layers
    assert fit.adapters[last].reduce == HEAD[fitted["kind"]]
    assert fit.adapters[first].reduce == "flatten"
    assert "reaches the output" in fit.sizes.notes["reduce"]
    assert fit.info["lossy_reduction_reaches_output"] is False
    assert fit.info["reduce"] == {first: "flatten", last: HEAD[fitted["kind"]]}
    assert fit.sizes.replaced_macs  # GPT-2's Conv1D layers are counted like Linear ones


def test_evaluate_with_dict_batches_is_strict_and_honest(fitted, data):
    metrics = fitted["probe"].evaluate(loader(data["test"]))
    assert metrics["model_accuracy"] >= 0.95
    assert metrics["agreement"] >= 0.95  # strict: the ignored tokens are their training mean
    assert metrics["mixed_agreement"] == metrics["agreement"]
    assert metrics["template_agreement"] == 1.0 and metrics["lossy_reduction_reaches_output"] is False
    assert metrics["reduce"] == HEAD[fitted["kind"]]
    assert 0.0 <= metrics["linear_baseline"]["agreement"] <= 1.0


def test_patch_takes_the_batch_as_the_model_does_and_leaves_the_model_alone(fitted, data):
    model, probe = fitted["model"], fitted["probe"]
    batch = next(iter(loader(data["test"], 64)))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    state = copy.deepcopy(model.state_dict())
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    with torch.no_grad():
        reference = model(**inputs).logits
        patched = probe.patch()
        out = patched(**inputs).logits
        if fitted["kind"] == "bert":  # BERT's forward takes (input_ids, attention_mask, ...)
            positional = probe.patch()(inputs["input_ids"], inputs["attention_mask"]).logits
        else:  # GPT-2's second argument is the cache
            positional = probe.patch()(inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    assert out.shape == reference.shape
    torch.testing.assert_close(positional, out)
    assert (out.argmax(1) == reference.argmax(1)).float().mean() >= 0.9
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, reference)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())  # noqa: SLF001
    assert not model.training
    assert all((g is None and p.grad is None) or torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))


def test_save_and_load_with_dict_batches(fitted, data, tmp_path):
    probe = fitted["probe"]
    probe.save(tmp_path / "probe.safetensors")
    loaded = KoopmanProbe.load(tmp_path / "probe.safetensors", fitted["model"], verbose=False)
    assert loaded.config == probe.config and loaded.fetch_model().info["reduce"] == probe.fetch_model().info["reduce"]
    batch = next(iter(loader(data["test"], 50)))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        torch.testing.assert_close(loaded.patch()(**inputs).logits, probe.patch()(**inputs).logits)
    assert loaded.evaluate(loader(data["test"]))["agreement"] == probe.evaluate(loader(data["test"]))["agreement"]


def test_unlearn_with_the_readme_call_on_dict_batches(fits, data):
    model, probe = fits["gpt2"]["model"], fits["gpt2"]["probe"]
    edited = probe.unlearn(1, loader(data["train"]))  # the README call
    logits, labels = predict(probe.patch(edited), loader(data["test"]))
    reference, _ = predict(model, loader(data["test"]))
    forget = labels == 1
    assert (logits[forget].argmax(1) == 1).float().mean() <= 0.02
    retain = (logits[~forget].argmax(1) == labels[~forget]).float().mean()
    assert retain >= (reference[~forget].argmax(1) == labels[~forget]).float().mean() - 0.02


def test_topology_and_baselines_read_dict_batches(fits, data):
    model, probe = fits["bert"]["model"], fits["bert"]["probe"]
    topo = probe.topology(loader(data["test"]), n_points=150, dims=(0,))
    assert len(topo["network_betti0"]) == 2 and len(topo["surrogate_betti0"]) == 2
    small = TokenSequenceDataset(256, seed=5)
    tuned, _ = finetune(model, loader(small, 64), 1, lr=1e-4)
    negated, _ = neggrad_plus(model, loader(small, 64), loader(small, 64), 1, lr=1e-4)
    fresh, _ = retrain(lambda: bert_classifier(4), loader(small, 64), 1)
    for module in (tuned, negated, fresh):
        logits, labels = predict(module, loader(small, 128))
        assert logits.shape == (256, 4) and labels.shape == (256,)
    features = ((f, y) for f, y, _ in layer_batches(model, LAYERS["bert"][-1], loader(small, 128)))
    erased, _ = leace_erasure(model, LAYERS["bert"][-1], features, [0])
    logits, _ = predict(erased, loader(small, 128))
    assert logits.shape == (256, 4)


def test_a_reduction_whose_ignored_part_reaches_the_output_is_flagged(fits, data):
    model = fits["gpt2"]["model"]
    # GPT-2's head reads the last real token: the token mean ignores what it reads
    probe = KoopmanProbe(model, LAYERS["gpt2"], reduce=[None, "mean"], label_key="labels", verbose=False)
    probe.fit(loader(data["train"]), epochs=1)
    assert probe.fetch_model().info["lossy_reduction_reaches_output"] is True
    metrics = probe.evaluate(loader(data["test"]))
    assert metrics["lossy_reduction_reaches_output"] is True and metrics["template_agreement"] < 1.0
    assert metrics["reduce"] == "mean" and "mixed_agreement" in metrics
    with pytest.warns(UserWarning, match="reaches the model's output") as seen:
        mixed = probe.patch(strict=False)
    assert {w.filename for w in seen} == {__file__}  # the caller's line, through KoopmanProbe.patch
    assert isinstance(mixed, PatchedModel) and not mixed.strict
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        probe.patch()  # strict: nothing to warn about


def test_naming_one_input_key_cannot_drop_the_mask(fitted, data):
    probe = KoopmanProbe(fitted["model"], LAYERS[fitted["kind"]], input_key="input_ids", verbose=False)
    with pytest.raises(ValueError, match="attention_mask"):
        probe.fit(loader(data["test"]), epochs=1)


def test_inputs_without_the_mask_the_fit_had_are_warned_about(fitted, data):
    probe = fitted["probe"]
    batch = next(iter(loader(data["test"], 64)))
    unmasked = {"input_ids": batch["input_ids"], "labels": batch["labels"]}
    reads_mask = fitted["kind"] == "gpt2"  # its "last" reduction reads the mask; BERT's "cls" does not
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            probe.patch()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            probe.evaluate([batch])
        assert not [w for w in caught if "attention mask" in str(w.message)]  # with the mask: silent
        with torch.no_grad():
            probe.patch()(input_ids=batch["input_ids"])
        probe.evaluate([unmasked])
    messages = [str(w.message) for w in caught if "attention mask" in str(w.message)]
    assert bool(messages) == reads_mask, messages
    if reads_mask:
        assert {m.split(" was fitted")[0] for m in messages} == {"the surrogate", "the probe"}
        assert all("'last' reduction reads every position as a real token" in m for m in messages)


def test_the_kept_rows_serve_the_edits_of_a_token_model(fitted, data):
    probe = KoopmanProbe(fitted["model"], LAYERS[fitted["kind"]], label_key="labels", verbose=False)
    probe.fit(loader(data["train"]), epochs=1, keep_cache=True)  # the README's no-second-pass workflow
    stats = probe.unlearning_statistics()  # with the refinement's rows: the cache holds ids and masks
    assert stats.reservoir is not None and len(stats.reservoir)
    edited = probe.unlearn(1, stats)
    assert edited.info["forget_classes"] == [1]


def test_transformers_own_capture_hooks_leave_the_fast_path_on(data):
    class Same(torch.nn.Module):  # a stand-in surrogate: layer.2 gets layer.0's states
        def forward(self, x: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
            return x

    torch.manual_seed(0)
    model = bert_classifier(4, num_layers=3).eval()  # untrained: only the paths' agreement matters
    first, last = "bert.encoder.layer.0", "bert.encoder.layer.2"  # layer.1 is skipped
    patched = PatchedModel(model, Same(), first, last)
    batch = next(iter(loader(data["test"], 32)))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        patched(**inputs)
        assert patched.path == "fast"
        model(**inputs, output_hidden_states=True)  # installs an output-capturing hook on every layer
        assert any(m._forward_hooks for m in model.modules())  # noqa: SLF001
        assert "full while hooks" not in repr(patched)
        full = PatchedModel(model, Same(), first, last, fast=False)
        torch.testing.assert_close(patched(**inputs).logits, full(**inputs).logits)
        asked = patched(**inputs, output_hidden_states=True)  # a kind of its own: checked, the full path's
        torch.testing.assert_close(asked.hidden_states[2], full(**inputs, output_hidden_states=True).hidden_states[2])


def test_batches_padded_on_the_other_side_than_the_fits_are_warned_about(fits, data, tmp_path):
    from koopman_hooks import KoopmanProbe

    fit = fits["gpt2"]
    probe = fit["probe"]
    assert probe.fetch_model().info["padding"] == "right"
    batch = next(iter(loader(data["test"], 64)))
    shifts = (batch["attention_mask"] == 0).sum(1)  # move every row's padding to its left
    left = {key: torch.stack([torch.roll(row, int(s)) for row, s in zip(value, shifts)]) if value.dim() == 2 else value
            for key, value in batch.items()}
    assert bool((left["attention_mask"][:, 0] == 0).any()) and bool((left["attention_mask"][:, -1] == 1).all())
    with pytest.warns(UserWarning, match="padded on the left, the fit's were padded on the right") as seen:
        probe.evaluate([left])
    assert {w.filename for w in seen} == {__file__}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        probe.evaluate([batch])  # the fit's side: no warning
    probe.save(tmp_path / "p.safetensors")
    assert KoopmanProbe.load(tmp_path / "p.safetensors", fit["model"]).fetch_model().info["padding"] == "right"


@pytest.mark.parametrize("kind", ["token_classification", "language_model"])
def test_evaluate_scores_every_real_token_of_a_per_token_head(kind, data):
    import transformers

    from koopman_hooks import KoopmanProbe

    torch.manual_seed(0)  # untrained models: evaluate's counts are checked against direct ones
    if kind == "token_classification":
        config = transformers.BertConfig(vocab_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=64, max_position_embeddings=64, num_labels=5, pad_token_id=0)
        model, layers = transformers.BertForTokenClassification(config).eval(), LAYERS["bert"]
    else:
        config = transformers.GPT2Config(vocab_size=16, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                         pad_token_id=0, use_cache=False)
        model, layers = transformers.GPT2LMHeadModel(config).eval(), LAYERS["gpt2"]
    batches = [{k: v for k, v in b.items() if k != "labels"} for b in loader(data["train"], 250)]
    probe = KoopmanProbe(model, layers, verbose=False).fit(batches, epochs=2)
    test = [{k: v for k, v in b.items() if k != "labels"} for b in loader(data["test"], 200)]
    if kind == "token_classification":  # a class per real token, -100 on padding, as HF's collators do
        for b in test:
            b["labels"] = torch.where(b["attention_mask"] == 1, b["input_ids"] % 5, -100)
    metrics = probe.evaluate(test)
    ours, theirs, labels, real = [], [], [], []
    with torch.no_grad():
        for b in test:
            inputs = {k: v for k, v in b.items() if k != "labels"}
            ours.append(model(**inputs).logits.argmax(-1))
            theirs.append(probe.patch()(**inputs).logits.argmax(-1))
            real.append(b["attention_mask"] == 1)
            labels.append(b.get("labels", torch.zeros_like(b["input_ids"])))
    ours, theirs, labels, real = (torch.cat(t) for t in (ours, theirs, labels, real))
    assert metrics["per_token"] and metrics["n_samples"] == 600 and metrics["n_tokens"] == int(real.sum())
    assert int(real.sum()) < real.numel()  # padding there, and left out
    assert metrics["agreement"] == pytest.approx(float((ours == theirs)[real].double().mean()), abs=1e-12)
    assert 0.5 < metrics["agreement"] < 1.0
    if kind == "token_classification":
        assert metrics["model_accuracy"] == pytest.approx(float((ours == labels)[real].double().mean()), abs=1e-12)
    else:
        assert "model_accuracy" not in metrics  # a causal LM's labels are shifted inside its loss: none given
