"""The svm and logistic heads of FeatureExtraction (test-time augmentation: ``test_tta_views.py``).

Real components: scikit-learn's 8x8 digits through a real timm backbone (``digit_cnn`` at 32 px, random
init: cheap on CPU, and the heads only need fixed features), a real Lightning Trainer via the CLI, and
scikit-learn's ``LinearSVC`` / ``LogisticRegression`` as the reference solvers on the very same cached features.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.svm import LinearSVC

from helpers import FAST, REPO, read_metrics, run_cli
from tl_lightning.data import DigitsDataModule
from tl_lightning.errors import TLError
from tl_lightning.methods import FeatureExtraction
from tl_lightning.methods.shallow_heads import fit_logistic, fit_svm, score, sweep_logistic

SVM_CONFIG = REPO / "configs/feature_extraction/svm_quickstart.yaml"
LOGISTIC_CONFIG = REPO / "configs/feature_extraction/logistic_quickstart.yaml"
SMALL = ("--model.backbone=digit_cnn", "--model.weights=none", "--data.image_size=32", "--data.batch_size=128")
REG_GRID = "[1.0e-5, 1.0e-3, 1.0e-2, 1.0e-1]"


def build(config, *args):
    """Model and DataModule exactly as ``fit`` would build them (same seed, same cached features)."""
    from tl_lightning.cli import run_cli as make_cli

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli = make_cli(["--config", str(config), *FAST, *SMALL, *args], run=False)
    cli.datamodule.setup("fit")
    return cli.model, cli.datamodule


def accuracy(decision: np.ndarray, y: np.ndarray) -> float:
    return float((decision.argmax(1) == y).mean())


@pytest.fixture(scope="module")
def svm_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("svm")
    # max_epochs=5 on purpose: a fitted head trains for exactly one (measuring) epoch
    run_cli("fit", "--config", SVM_CONFIG, *FAST, *SMALL, f"--trainer.default_root_dir={run_dir}",
            "--trainer.max_epochs=5")
    return run_dir


@pytest.fixture(scope="module")
def logistic_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("logistic")
    run_cli("fit", "--config", LOGISTIC_CONFIG, *FAST, *SMALL, f"--trainer.default_root_dir={run_dir}",
            f"--model.reg_grid={REG_GRID}")
    return run_dir


def test_svm_head_matches_linear_svc_on_the_same_cached_features(svm_run):
    metrics = read_metrics(svm_run)
    assert metrics["head_fit"]["head"] == "svm" and metrics["head_fit"]["C"] == 1.0
    assert metrics["epochs"] == 1, "the fitted head must not train for max_epochs"
    ours = metrics["metrics"]["test/acc"]

    model, dm = build(SVM_CONFIG)
    x_train, y_train = model.embedded(dm.feature_matrices("train"))
    x_test, y_test = model.embedded(dm.feature_matrices("test"))
    assert torch.allclose(x_train.norm(dim=1), torch.ones(len(x_train)), atol=1e-5)  # l2_normalize in the config
    ref = LinearSVC(C=1.0, loss="squared_hinge", max_iter=20000, tol=1e-6).fit(x_train.numpy(), y_train.numpy())
    theirs = accuracy(ref.decision_function(x_test.numpy()), y_test.numpy())
    assert theirs > 0.5, "the reference must be a real classifier for the comparison to mean anything"
    assert abs(ours - theirs) <= 0.01, (ours, theirs)
    # the feature plot callback of the config wrote its PNG into the run dir
    assert (svm_run / "features_test_pca.png").stat().st_size > 5000


def test_logistic_head_picks_the_best_validation_strength_and_matches_sklearn(logistic_run):
    metrics = read_metrics(logistic_run)
    fit = metrics["head_fit"]
    grid, scores = fit["reg_grid"], fit["val_scores"]
    assert grid == [1e-5, 1e-3, 1e-2, 1e-1]
    assert fit["reg"] == grid[int(np.argmax(scores))] and fit["val_score"] == max(scores)
    assert max(scores) - min(scores) > 0.05, "the grid must matter (reg=0.1 underfits), or the test proves nothing"

    model, dm = build(LOGISTIC_CONFIG, f"--model.reg_grid={REG_GRID}")
    x_train, y_train = (t.numpy() for t in model.embedded(dm.feature_matrices("train")))
    x_val, y_val = (t.numpy() for t in model.embedded(dm.feature_matrices("val")))
    x_test, y_test = (t.numpy() for t in model.embedded(dm.feature_matrices("test")))

    # scikit-learn's C for "mean CE + reg/2 ||W||^2" on N samples is 1 / (reg * N)
    def sklearn_fit(x, y, reg):
        return LogisticRegression(C=1.0 / (reg * len(x)), max_iter=5000, tol=1e-8).fit(x, y)

    sk_val = [accuracy(sklearn_fit(x_train, y_train, r).decision_function(x_val), y_val) for r in grid]
    for ours, theirs in zip(scores, sk_val):  # the sweep itself agrees with scikit-learn, strength by strength
        assert abs(ours - theirs) <= 0.01 + 1e-9, (scores, sk_val)
    assert sk_val[grid.index(fit["reg"])] >= max(sk_val) - 0.01

    # the final model is refitted on train+val with the chosen strength
    x_tv, y_tv = np.concatenate([x_train, x_val]), np.concatenate([y_train, y_val])
    refitted = sklearn_fit(x_tv, y_tv, fit["reg"])
    theirs = accuracy(refitted.decision_function(x_test), y_test)
    ours = metrics["metrics"]["test/acc"]
    assert theirs > 0.5 and abs(ours - theirs) <= 0.01, (ours, theirs)

    # val/* stays a held-out number: it is the chosen strength's train-only fit on val (the score the choice was
    # made on), not the refitted head, which has seen the validation images
    assert abs(metrics["metrics"]["val/acc"] - fit["val_score"]) < 1e-6, (metrics["metrics"]["val/acc"], fit)
    seen = accuracy(refitted.decision_function(x_val), y_val)
    assert seen > fit["val_score"] + 0.02, "the refit must score visibly higher on val, or this proves nothing"
    # the train-only head travels in the checkpoint: validate from it reports the same held-out number
    ckpt = metrics["best_checkpoint"] or next((logistic_run / "checkpoints").glob("*.ckpt"))
    validated = logistic_run.parent / (logistic_run.name + "_validate")
    run_cli("validate", "--config", LOGISTIC_CONFIG, *FAST, *SMALL, f"--model.reg_grid={REG_GRID}",
            f"--ckpt_path={ckpt}", f"--trainer.default_root_dir={validated}")
    assert abs(read_metrics(validated)["metrics"]["val/acc"] - fit["val_score"]) < 1e-6


# ----- solver-level checks on real data without a backbone (the 64 raw pixels of the digits) ---------------
@pytest.fixture(scope="module")
def pixels():
    d = load_digits()
    x = torch.tensor(d.data / 16.0, dtype=torch.float32)
    y = torch.tensor(d.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return x[perm[:1000]], y[perm[:1000]], x[perm[1000:]], y[perm[1000:]]


def multilabel_targets(y: torch.Tensor) -> torch.Tensor:
    """Three overlapping labels of a digit: even, greater than 4, round (0, 6, 8, 9)."""
    return torch.stack([y % 2 == 0, y > 4, (y == 0) | (y == 6) | (y == 8) | (y == 9)], 1).float()


def test_fit_svm_matches_linear_svc_multiclass_and_multilabel(pixels):
    x, y, xt, yt = pixels
    ours = score(fit_svm(x, y, 10, C=0.5).logits(xt), yt, 10, False)
    ref = LinearSVC(C=0.5, max_iter=20000, tol=1e-6).fit(x.numpy(), y.numpy())
    assert abs(ours - accuracy(ref.decision_function(xt.numpy()), yt.numpy())) <= 0.01

    ym, ymt = multilabel_targets(y), multilabel_targets(yt)
    ours = score(fit_svm(x, ym, 3, multilabel=True, C=0.5).logits(xt), ymt, 3, True)
    decisions = np.stack([LinearSVC(C=0.5, max_iter=20000, tol=1e-6).fit(x.numpy(), ym[:, j].numpy())
                          .decision_function(xt.numpy()) for j in range(3)], 1)
    theirs = score(torch.tensor(decisions), ymt, 3, True)
    assert theirs > 0.8 and abs(ours - theirs) <= 0.01, (ours, theirs)


def test_fit_logistic_multilabel_is_one_vs_rest_and_ignores_minus_one(pixels):
    x, y, xt, yt = pixels
    ym, ymt = multilabel_targets(y), multilabel_targets(yt)
    reg = 1e-3
    ours = score(fit_logistic(x, ym, 3, multilabel=True, reg=reg).logits(xt), ymt, 3, True)
    decisions = np.stack([LogisticRegression(C=1 / (reg * len(x)), max_iter=5000).fit(x.numpy(), ym[:, j].numpy())
                          .decision_function(xt.numpy()) for j in range(3)], 1)
    assert abs(ours - score(torch.tensor(decisions), ymt, 3, True)) <= 0.01

    # -1 removes a (sample, label) pair from that label's problem only: the same label-0 model as
    # dropping those samples, times the ratio of sample counts the mean loss divides by
    ignored = torch.arange(len(x)) % 3 == 0
    masked = ym.clone()
    masked[ignored, 0] = -1
    full = fit_logistic(x, masked, 3, multilabel=True, reg=reg, tol=1e-10)
    kept = fit_logistic(x[~ignored], ym[~ignored][:, :1], 1, multilabel=True,
                        reg=reg * len(x) / int((~ignored).sum()), tol=1e-10)
    assert torch.allclose(full.weight[0], kept.weight[0], atol=5e-3)  # up to the solver tolerance
    assert torch.allclose(full.bias[0], kept.bias[0], atol=5e-3)


def test_sweep_keeps_the_strength_with_the_best_validation_score(pixels):
    x, y, xv, yv = pixels
    grid = [1e-6, 1e-2, 1.0, 100.0]
    sweep = sweep_logistic(x, y, xv, yv, 10, grid=grid)
    recomputed = [score(fit_logistic(x, y, 10, reg=r).logits(xv), yv, 10, False) for r in grid]
    assert np.allclose(sweep.val_scores, recomputed, atol=0.005)
    assert sweep.best_reg == grid[int(np.argmax(sweep.val_scores))]
    assert sweep.val_scores[grid.index(100.0)] < max(sweep.val_scores) - 0.1  # the grid matters


def test_fitted_heads_refuse_training_augmentation_and_mlp():
    model = FeatureExtraction(backbone="digit_cnn", weights="none", head="logistic")
    with pytest.raises(TLError, match="augment"):
        model.fit_head(DigitsDataModule(augment=True, backbone="digit_cnn", image_size=32, num_workers=0))
    with pytest.raises(TLError, match="hidden_dim"):
        FeatureExtraction(backbone="digit_cnn", weights="none", head="svm", hidden_dim=32)
    with pytest.raises(TLError, match="C must be positive"):
        fit_svm(torch.zeros(4, 2), torch.tensor([0, 1, 0, 1]), 2, C=0.0)


@pytest.mark.parametrize("head", ["svm", "logistic"])
def test_fitted_heads_on_multilabel_voc_report_map(tmp_path, head):
    from fixtures.datasets import random_voc_objects, write_voc2007

    objects = random_voc_objects(36, seed=1)
    ids = sorted(objects)
    write_voc2007(tmp_path / "voc", objects=objects, sets={"train": ids[:20], "val": ids[20:28], "test": ids[28:]})
    run_dir = tmp_path / "run"
    run_cli("fit", "--model=tl_lightning.methods.FeatureExtraction", f"--model.head={head}",
            "--model.reg_grid=[1.0e-3, 1.0]", "--data=tl_lightning.data.voc2007.VOC2007DataModule",
            f"--data.data_dir={tmp_path / 'voc'}", f"--trainer.default_root_dir={run_dir}", *FAST, *SMALL)
    metrics = read_metrics(run_dir)
    assert 0 <= metrics["metrics"]["test/mAP"] <= 1 and "test/acc" not in metrics["metrics"]
    assert metrics["head_fit"]["head"] == head and metrics["epochs"] == 1
    if head == "logistic":
        assert len(metrics["head_fit"]["val_scores"]) == 2
