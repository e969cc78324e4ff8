"""Read-outs as published (every block, every conv layer), named recipes, ``recipe: auto`` and TTA in predict.

Real components: timm backbones, the real feature cache (synthetic features are planted under the very keys
the DataModule's served features read, through the cache's public ``save``), the CLI's ``fit`` and ``predict``
in process, and the checkpoint a fit writes.
"""
from __future__ import annotations

import csv
import re
import warnings

import pytest
import torch

from helpers import FAST, REPO, read_metrics, run_cli
from tl_lightning.backbones import FeatureExtractor, create_backbone
from tl_lightning.backbones.features import resolve_layers
from tl_lightning.errors import TLError
from tl_lightning.methods import FeatureExtraction
from tl_lightning.methods.recipes import CANDIDATES, RECIPES
from tl_lightning.tta import view_transforms

SVM_CONFIG = REPO / "configs/feature_extraction/svm_quickstart.yaml"
SMALL = ("--model.backbone=digit_cnn", "--model.weights=none", "--data.image_size=32", "--data.batch_size=256",
         "--model.reg_grid=[1.0e-4, 1.0e-2, 1.0]", "--model.svm_c_grid=[0.01, 1.0]")


def test_every_block_and_every_conv_read_every_layer_of_efficientnet_lite0():
    model = create_backbone("tf_efficientnet_lite0", "bundled", num_classes=0).eval()
    x = torch.randn(2, 3, 64, 64)
    blocks = FeatureExtractor(model, "every_block")
    assert blocks.layers[:-1] == [f"blocks.{s}.{b}" for s, n in enumerate((1, 2, 2, 3, 3, 4, 1)) for b in range(n)]
    assert "blocks.3.0" in blocks.layers and "blocks.5.0" in blocks.layers  # stages that `all` skips
    assert blocks(x).shape == (2, 3088)
    blocks.remove_hooks()
    convs = FeatureExtractor(model, "every_conv")
    convolutions = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs.layers) == len(convolutions) == 49
    with torch.no_grad():
        every, penultimate = convs(x), FeatureExtractor(model, "penultimate")(x)
    assert every.shape == (2, sum(c.out_channels for c in convolutions)) == (2, 21008)
    # the last conv layer (conv_head, read after its BatchNorm + ReLU6) averaged over space is the penultimate
    assert torch.allclose(every[:, -1280:], penultimate, atol=1e-5)
    assert every[:, :32].min() >= 0 and every[:, :32].max() <= 6, "the stem is read after its ReLU6"
    all_layers = FeatureExtractor(model, "all").layers
    assert all_layers == ["blocks.0", "blocks.1", "blocks.2", "blocks.4", "blocks.6", "penultimate"]


def test_recipe_names_set_the_read_out_and_the_head():
    fe = FeatureExtraction(backbone="digit_cnn", weights="none", num_classes=3, recipe="fne+l2+svm")
    assert (fe.embedding, fe.l2_normalize, fe.head_type) == ("fne", True, "svm")
    assert fe.extractor.layers == ["conv1.1", "conv2.1"] and fe.svm_c_grid
    assert len(CANDIDATES) == len(RECIPES) == 8
    with pytest.raises(TLError, match="unknown recipe 'fne\\+sgd'"):
        FeatureExtraction(backbone="digit_cnn", weights="none", recipe="fne+sgd")


def build(*args):
    """Model and DataModule exactly as ``fit`` builds them (same seed, hence the same weights and cache keys)."""
    from tl_lightning.cli import run_cli as make_cli

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli = make_cli(["--config", str(SVM_CONFIG), *FAST, *SMALL, *args], run=False)
    cli.datamodule.setup("fit")
    cli.datamodule.setup("test")
    return cli.model, cli.datamodule


def extracted(dm, split: str, dataset, layers) -> dict:
    """The data side's extraction of ``dataset`` with read-out ``layers`` (real, tiny; cached)."""
    out = dm.served_features.source.extract_readouts(split, dataset, dm.make_loader, {"x": layers})
    return {"features": out["x"], "targets": out["targets"]}


def plant_entry(dm, dataset, layers, value: dict) -> None:
    """Store ``value`` under the cache key the DataModule reads for ``dataset`` with read-out ``layers``."""
    source = dm.served_features.source
    source.cache.save(source.key(dataset, resolve_layers(source.model, layers)), value)


def plant(dm, informative: str) -> None:
    """Replace the cached features of both read-outs: only ``informative`` carries the class, the other is noise."""
    gen = torch.Generator().manual_seed(0)
    for readout in ("penultimate", "fne"):
        layers = RECIPES[f"{readout}+logistic"].layers
        for split in ("train", "val", "test"):
            dataset = dm.split_dataset(split, deterministic=True)
            real = extracted(dm, split, dataset, layers)
            targets, dim = real["targets"], real["features"].shape[1]
            noise = torch.randn(len(targets), dim, generator=gen)
            if readout == informative:
                centres = torch.randn(10, dim, generator=torch.Generator().manual_seed(1)) * 2
                noise = noise + centres[targets]
            plant_entry(dm, dataset, layers, {"features": noise, "targets": targets})


@pytest.mark.parametrize("informative", ["fne", "penultimate"])
def test_auto_picks_the_only_read_out_that_separates_the_classes(tmp_path, capsys, informative):
    cache, run_dir = tmp_path / "cache", tmp_path / "run"
    _, dm = build(f"--model.cache_dir={cache}", "--model.recipe=auto")
    plant(dm, informative)
    run_cli("fit", "--config", SVM_CONFIG, *FAST, *SMALL, f"--model.cache_dir={cache}", "--model.recipe=auto",
            f"--trainer.default_root_dir={run_dir}")
    metrics = read_metrics(run_dir)
    selection = metrics["recipe_selection"]
    scores = {c["recipe"]: c["val_score"] for c in selection["candidates"]}
    assert sorted(scores) == sorted(RECIPES) and selection["metric"] == "val/acc"
    assert selection["chosen"].split("+")[0] == informative
    assert scores[selection["chosen"]] == max(scores.values()) > 0.9
    assert max(s for r, s in scores.items() if not r.startswith(informative)) < 0.3, "noise read-out: chance"
    assert metrics["metrics"]["test/acc"] > 0.9
    assert metrics["head_fit"]["head"] == RECIPES[selection["chosen"]].head
    assert metrics["head_fit"]["refit_on"] == "train+val"
    assert re.search(rf"\nrecipe +\| {re.escape(selection['chosen'])} \(auto\)\n", capsys.readouterr().out)

    # predict from the checkpoint in a fresh model: the head takes the chosen read-out's shape before loading
    run_cli("predict", "--config", SVM_CONFIG, *FAST, *SMALL, f"--model.cache_dir={cache}", "--model.recipe=auto",
            f"--trainer.default_root_dir={run_dir}", "--ckpt_path", run_dir / "checkpoints" / "last.ckpt")
    with open(run_dir / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(dm.split_dataset("test"))


def test_auto_scores_every_candidate_on_the_averaged_tta_views(tmp_path):
    """Planted views: each view of either read-out alone is noise, but the two views of the FNE read-out average
    to class centres. Only a selection that reads the averaged views can find the FNE candidates."""
    cache, run_dir = tmp_path / "cache", tmp_path / "run"
    model, dm = build(f"--model.cache_dir={cache}", "--model.recipe=auto", "--model.tta_views=2")
    gen = torch.Generator().manual_seed(0)
    for readout in ("penultimate", "fne"):
        layers = RECIPES[f"{readout}+logistic"].layers
        for split in ("train", "val", "test"):
            base = dm.split_dataset(split, deterministic=True)
            views = view_transforms(base.transform, 2, flips=getattr(dm, "hflip", 0) > 0, crop=model.tta_crop)
            first = extracted(dm, split, base.with_transform(views[0]), layers)
            targets, dim = first["targets"], first["features"].shape[1]
            noise = torch.randn(len(targets), dim, generator=gen) * 5
            centres = torch.randn(10, dim, generator=torch.Generator().manual_seed(1))
            mean = centres[targets] if readout == "fne" else torch.zeros(len(targets), dim)
            for view, features in zip(views, (mean + noise, mean - noise)):  # the views average to ``mean``
                plant_entry(dm, base.with_transform(view), layers, {"features": features, "targets": targets})
    run_cli("fit", "--config", SVM_CONFIG, *FAST, *SMALL, f"--model.cache_dir={cache}", "--model.recipe=auto",
            "--model.tta_views=2", f"--trainer.default_root_dir={run_dir}")
    metrics = read_metrics(run_dir)
    selection = metrics["recipe_selection"]
    scores = {c["recipe"]: c["val_score"] for c in selection["candidates"]}
    assert selection["tta_views"] == 2 and selection["chosen"].startswith("fne")
    assert min(s for r, s in scores.items() if r.startswith("fne") and "svm" not in r) > 0.9
    assert max(s for r, s in scores.items() if r.startswith("penultimate")) < 0.3, "noise read-out: chance"
    assert metrics["metrics"]["test/acc"] > 0.9 and metrics["head_fit"]["tta_views"] == 2


def test_pinned_recipe_sweeps_the_svm_c_and_refits_on_train_and_val(tmp_path):
    run_dir = tmp_path / "run"
    run_cli("fit", "--config", SVM_CONFIG, *FAST, *SMALL, "--model.recipe=penultimate+l2+svm",
            f"--trainer.default_root_dir={run_dir}")
    metrics = read_metrics(run_dir)
    assert "recipe_selection" not in metrics and metrics["summary"] == {"recipe": "penultimate+l2+svm"}
    fit = metrics["head_fit"]
    assert fit["head"] == "svm" and fit["C_grid"] == [0.01, 1.0] and fit["C"] in fit["C_grid"]
    assert len(fit["val_scores"]) == 2 and fit["refit_on"] == "train+val"


def test_predict_averages_the_same_tta_views_as_test(tmp_path):
    views, run_dir, cache = 3, tmp_path / "run", tmp_path / "cache"
    common = ("--config", SVM_CONFIG, *FAST, *SMALL, f"--model.tta_views={views}", f"--model.cache_dir={cache}",
              f"--trainer.default_root_dir={run_dir}")
    run_cli("fit", *common)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    run_cli("predict", *common, "--ckpt_path", ckpt)  # without predict_dir: the test split, in order
    with open(run_dir / "predictions.csv") as f:
        rows = list(csv.DictReader(f))

    model, dm = build(f"--model.tta_views={views}", f"--model.cache_dir={cache}")
    model.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"])
    with torch.no_grad():
        x, _ = model.embedded(dm.feature_matrices("test"))  # the view-averaged features test is scored on
        probs = model.head(x).softmax(-1)
        single = model.head(model.embed(extracted(dm, "test", dm.split_dataset("test", deterministic=True),
                                                  "penultimate")["features"])).softmax(-1)
    score, pred = probs.max(-1)
    assert len(rows) == len(x)
    assert [r["class"] for r in rows] == [model.class_names[p] for p in pred.tolist()]
    assert torch.allclose(torch.tensor([float(r["score"]) for r in rows], dtype=torch.float64),
                          score.double(), atol=1e-4)
    assert not torch.allclose(single.max(-1).values, score, atol=1e-3), "one view would give other scores"


def test_full_batch_heads_with_more_features_than_samples_match_scikit_learn():
    """With D > N the heads are solved in the row space of the features; the solution is the full problem's."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import LinearSVC

    from tl_lightning.methods.shallow_heads import fit_logistic, fit_svm, row_space

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 500, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (40,), generator=gen)
    space = row_space(x)
    basis = space.basis
    assert torch.allclose(space.coords, x @ basis)
    assert basis.shape == (500, 40) and torch.allclose(basis.T @ basis, torch.eye(40, dtype=torch.float64))
    reg = 1e-2
    ours = fit_logistic(x, y, 3, reg=reg, tol=1e-9, max_iter=2000)
    ref = LogisticRegression(C=1 / (reg * len(x)), tol=1e-10, max_iter=10000).fit(x.numpy(), y.numpy())
    assert np.abs(ours.logits(x).numpy() - ref.decision_function(x.numpy())).max() < 0.01
    assert ours.weight.shape == (3, 500)
    # the weights lie in the span of the samples: nothing outside it changes a prediction
    assert torch.allclose(ours.weight - ours.weight @ basis @ basis.T, torch.zeros(3, 500, dtype=torch.float64),
                          atol=1e-8)
    svm = fit_svm(x, y, 3, C=0.1, tol=1e-9, max_iter=2000)
    ref_svm = LinearSVC(C=0.1, tol=1e-10, max_iter=100000, intercept_scaling=1e3).fit(x.numpy(), y.numpy())
    assert np.abs(svm.logits(x).numpy() - ref_svm.decision_function(x.numpy())).max() < 0.01
    # linearly dependent rows (repeated images): the basis spans more than the rows, the minimiser is the same
    x_dup, y_dup = torch.cat([x, x[:10]]), torch.cat([y, y[:10]])
    assert row_space(x_dup).basis.shape == (500, 50)
    dup = fit_logistic(x_dup, y_dup, 3, reg=reg, tol=1e-9, max_iter=2000)
    ref_dup = LogisticRegression(C=1 / (reg * len(x_dup)), tol=1e-10, max_iter=10000).fit(x_dup.numpy(), y_dup.numpy())
    assert np.abs(dup.logits(x).numpy() - ref_dup.decision_function(x.numpy())).max() < 0.01


def test_auto_leaves_the_backbone_bit_identical_and_test_features_equal_a_fresh_extraction(tmp_path):
    """Regression: a read-out built for selection must not leave the shared backbone in train mode, where the
    next forward pass would move its BatchNorm statistics (and every later feature, cached under the old key)."""
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    fresh, dm = build(f"--model.cache_dir={tmp_path / 'other'}", "--model.cache=false")
    before = {k: v.clone() for k, v in fresh.extractor.model.state_dict().items()}
    assert any("running_mean" in k for k in before), "the backbone has BatchNorm statistics to protect"
    run_cli("fit", "--config", SVM_CONFIG, *FAST, *SMALL, f"--model.cache_dir={cache}", "--model.recipe=auto",
            f"--trainer.default_root_dir={run_dir}")
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    for k, v in before.items():
        assert torch.equal(state[f"extractor.model.{k}"], v), k
    _, served = build(f"--model.cache_dir={cache}", "--model.recipe=auto")
    test = dm.split_dataset("test", deterministic=True)
    cached = served.feature_matrices("test")["penultimate"]  # written by the fit
    fresh.eval()
    with torch.no_grad():
        direct = torch.cat([fresh.extractor(x) for x, _ in dm.make_loader(test, shuffle=False)])
    assert torch.allclose(cached, direct, atol=1e-5)
