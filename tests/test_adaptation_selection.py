"""Domain adaptation, issue 16: class-balanced domain losses, DANN's published head placement, and model selection
without target labels (DEV, You et al. 2019)."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from helpers import FAST, run_cli
from tl_lightning.errors import TLError
from tl_lightning.losses import confusion_loss, domain_balanced_mean, domain_loss, grad_reverse
from tl_lightning.methods.adaptation import DomainAdaptation
from tl_lightning.methods.dev_risk import density_ratios, dev_estimate, dev_risk

CONFIG = "configs/adaptation/digits_offline.yaml"


# ----- balanced domain losses ----------------------------------------------------------------------------------
@pytest.mark.parametrize("n_target", [64, 74, 94, 164])  # 64 unlabelled + 10k labelled, k = 0, 1, 3, 10
def test_each_domain_carries_half_of_the_domain_losses_at_any_k(n_target):
    domains = torch.cat([torch.zeros(64), torch.ones(n_target)]).long()
    per_sample = torch.rand(len(domains), requires_grad=True)
    domain_balanced_mean(per_sample, domains).backward()
    grad = per_sample.grad
    assert grad[domains == 0].sum() == pytest.approx(0.5) and grad[domains == 1].sum() == pytest.approx(0.5)

    logits = torch.randn(len(domains), 2)
    ce = F.cross_entropy(logits, domains, reduction="none")
    expected = 0.5 * ce[domains == 0].mean() + 0.5 * ce[domains == 1].mean()
    assert domain_loss(logits, domains) == pytest.approx(float(expected), rel=1e-5)
    # a classifier that always says "target" scores exactly chance (log 2 per domain pair), whatever the share
    always_target = torch.tensor([[-1.0, 1.0]]).repeat(len(domains), 1)
    balanced = 0.5 * (F.cross_entropy(always_target[:1], torch.tensor([0])) +
                      F.cross_entropy(always_target[:1], torch.tensor([1])))
    assert domain_loss(always_target, domains) == pytest.approx(float(balanced), rel=1e-5)
    conf = -F.log_softmax(logits, -1).mean(-1)
    assert confusion_loss(logits, domains) == pytest.approx(
        float(0.5 * conf[domains == 0].mean() + 0.5 * conf[domains == 1].mean()), rel=1e-5)


def test_a_single_domain_batch_is_its_own_mean():
    per_sample = torch.tensor([1.0, 2.0, 6.0])
    assert domain_balanced_mean(per_sample, torch.ones(3).long()) == pytest.approx(3.0)


# ----- DANN as published: the domain classifier on the conv features --------------------------------------------
def _domain_grads(model: DomainAdaptation) -> dict[str, float]:
    x = torch.randn(8, 3, 32, 32)
    domains = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    domain_features, _ = model.trunk(x)
    domain_loss(model.domain_classifier(grad_reverse(domain_features, 1.0)), domains).backward()
    return {name: 0.0 if p.grad is None else float(p.grad.abs().sum()) for name, p in model.named_parameters()}


def test_published_dann_network_keeps_the_label_predictor_out_of_the_domain_loss():
    torch.manual_seed(0)
    model = DomainAdaptation(backbone="digit_cnn_dann", domain_input="conv", confusion="gradient_reversal",
                             num_classes=10)
    # label predictor fc100-fc100-fc10; the domain classifier reads the 48 x 5 x 5 conv features
    linears = [m for m in model.features.fc if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(1200, 100), (100, 100)]
    assert (model.classifier.in_features, model.classifier.out_features) == (100, 10)
    assert model.domain_classifier[0].in_features == 1200
    grads = _domain_grads(model)
    assert all(g == 0.0 for n, g in grads.items() if n.startswith(("features.fc", "classifier.")))
    assert grads["features.conv1.0.weight"] > 0 and grads["features.conv2.0.weight"] > 0
    # what the label predictor computes is the network's own head on those conv features
    x = torch.randn(4, 3, 32, 32)
    model.eval()
    _, label_features = model.trunk(x)
    assert torch.allclose(model.classifier(label_features), model(x))

    embedding = DomainAdaptation(backbone="digit_cnn_dann", confusion="gradient_reversal", num_classes=10)
    assert _domain_grads(embedding)["features.fc.1.weight"] > 0  # the default: the fc layers are adapted too


# ----- DEV: label-free model selection --------------------------------------------------------------------------
def test_dev_recovers_the_target_risk_and_picks_the_model_that_is_better_on_the_target():
    """Source N(0, 1), target N(1.5, 1) in a 2-d feature space. Model A errs where the source is dense, model B
    where the target is: B has the lower source risk, A the lower target risk. DEV must rank them as the target
    does and estimate each target risk closely."""
    g = torch.Generator().manual_seed(0)
    source = torch.randn(3000, 2, generator=g)
    target = torch.randn(2000, 2, generator=g) + torch.tensor([1.5, 0.0])
    loss_a = lambda f: 2 * torch.sigmoid(-3 * f[:, 0])  # noqa: E731  high for small x: the source's region
    loss_b = lambda f: 0.2 + 2 * torch.sigmoid(3 * (f[:, 0] - 1.2))  # noqa: E731  high in the target's region
    weights = density_ratios(source, target)
    true_ratio = torch.exp(1.5 * source[:, 0] - 1.125)
    assert torch.corrcoef(torch.stack([weights.log().float(), true_ratio.log()]))[0, 1] > 0.98
    risks = {}
    for name, loss in (("a", loss_a), ("b", loss_b)):
        risks[name] = dev_risk(loss(source), weights)
        assert risks[name] == pytest.approx(float(loss(target).mean()), abs=0.06)
    assert loss_a(source).mean() > loss_b(source).mean()  # plain source validation prefers B
    assert risks["a"] < risks["b"]  # DEV prefers A, as the target risk does


def test_dev_equals_the_source_risk_when_the_domains_match():
    g = torch.Generator().manual_seed(1)
    source, target = torch.randn(2000, 4, generator=g), torch.randn(2000, 4, generator=g)
    losses = torch.rand(2000, generator=g)
    assert dev_risk(losses, density_ratios(source, target)) == pytest.approx(float(losses.mean()), abs=0.02)


def test_dev_standard_error_is_the_spread_of_the_estimate_over_resampled_validation_splits():
    """With the true density ratio of the shifted Gaussians above, the reported standard error matches the standard
    deviation of the DEV estimate over 300 independent source validation samples. The loss is nearly constant, so
    the control variate removes almost all of the weights' variance: the standard error of the plain weighted mean
    would be 280 times too large here. With equal domains (w = 1) it is the standard error of the mean loss."""
    g = torch.Generator().manual_seed(2)
    loss = lambda f: 1 + 0.2 * torch.sigmoid(-3 * f[:, 0])  # noqa: E731
    estimates, errors = [], []
    for _ in range(300):
        source = torch.randn(1000, 2, generator=g)
        risk, standard_error = dev_estimate(loss(source), torch.exp(1.5 * source[:, 0] - 1.125))
        estimates.append(risk)
        errors.append(standard_error)
    spread = torch.tensor(estimates).std().item()
    assert spread == pytest.approx(float(torch.tensor(errors).mean()), rel=0.15)
    losses = torch.rand(500, generator=g)
    assert dev_estimate(losses, torch.ones(500)) == pytest.approx(
        (float(losses.mean()), float(losses.std() / 500 ** 0.5)))


def _fit(tmp_path, *overrides):
    run_dir = tmp_path / "run"
    run_cli("fit", "--config", CONFIG, *FAST, f"--trainer.default_root_dir={run_dir}", "--trainer.max_epochs=2",
            "--model.init_args.source_pretrain_epochs=1", "--data.init_args.epoch=2",
            "--data.init_args.num_workers=0", "--data.init_args.source.init_args.samples_per_class=20",
            "--trainer.limit_test_batches=1", *overrides)
    return json.loads((run_dir / "metrics.json").read_text()), torch.load(
        run_dir / "checkpoints" / "last.ckpt", weights_only=False)


def _best_checkpoint(ckpt: dict) -> dict:
    return next(v for k, v in ckpt["callbacks"].items() if k.startswith("BestCheckpoint"))


def test_unsupervised_runs_select_by_dev_and_semi_supervised_ones_by_target_accuracy(tmp_path):
    metrics, ckpt = _fit(tmp_path / "k0", "--data.init_args.labelled_per_class=0",
                         "--model.init_args.soft_label_weight=0")
    assert _best_checkpoint(ckpt)["monitor"] == "val/dev_score"
    assert metrics["metrics"]["val/dev_risk"] > 0 and "val/target_acc" in metrics["metrics"]
    assert 0 < metrics["metrics"]["val/dev_risk_se"] < metrics["metrics"]["val/dev_risk"]
    _, ckpt = _fit(tmp_path / "k3")
    assert _best_checkpoint(ckpt)["monitor"] == "val/target_acc"
    _, ckpt = _fit(tmp_path / "oracle", "--data.init_args.labelled_per_class=0",
                   "--model.init_args.soft_label_weight=0", "--model.init_args.selection=target_acc")
    assert _best_checkpoint(ckpt)["monitor"] == "val/target_acc"


@pytest.mark.parametrize("mode", ["source_only", "target_only"])
def test_per_domain_batchnorm_is_refused_for_a_one_domain_baseline(mode):
    """A baseline trains on one domain: the other's BatchNorm statistics would stay at their initial values and
    every score on that domain would be silently wrong."""
    with pytest.raises(TLError, match="domain_batchnorm keeps one set"):
        DomainAdaptation(backbone="digit_cnn", mode=mode, domain_batchnorm=True, num_classes=10)


def test_test_after_fit_uses_the_runs_own_checkpoint_when_another_checkpoint_callback_comes_first(tmp_path):
    """trainer.checkpoint_callback is the *first* ModelCheckpoint: a user's extra one (here the worst checkpoint by
    DEV) must not become the checkpoint that fit tests and metrics.json reports."""
    worst = tmp_path / "worst"
    metrics, _ = _fit(tmp_path, "--data.init_args.labelled_per_class=0", "--model.init_args.soft_label_weight=0",
                      "--trainer.max_epochs=3", "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                      "--trainer.callbacks.monitor=val/dev_risk", "--trainer.callbacks.mode=max",
                      f"--trainer.callbacks.dirpath={worst}", "--trainer.callbacks.filename=worst")
    run_dir = tmp_path / "run"
    best = metrics["best_checkpoint"]
    assert best.startswith(str(run_dir / "checkpoints" / "best-"))
    tested = {}
    for name, ckpt in (("best", best), ("worst", worst / "worst.ckpt")):
        run_cli("test", "--config", CONFIG, *FAST, "--data.init_args.labelled_per_class=0",
                "--model.init_args.soft_label_weight=0", "--data.init_args.num_workers=0",
                "--data.init_args.source.init_args.samples_per_class=20", "--trainer.limit_test_batches=1",
                f"--ckpt_path={ckpt}", f"--trainer.default_root_dir={tmp_path / name}")
        tested[name] = json.loads((tmp_path / name / "metrics.json").read_text())["metrics"]["test/target_loss"]
    assert tested["best"] != tested["worst"]  # two different checkpoints
    assert metrics["metrics"]["test/target_loss"] == pytest.approx(tested["best"], rel=1e-6)
