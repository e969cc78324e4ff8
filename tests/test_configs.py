"""Every shipped config (``configs/**/*.yaml``) parses and builds its model, DataModule and Trainer, and the values
it sets reach the objects. Overlays (a config that only adds to another) are built on top of their base config."""
from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml

from helpers import REPO

CONFIGS = sorted(str(p.relative_to(REPO)) for p in (REPO / "configs").rglob("*.yaml"))
#: overlays and the config each is documented with
OVERLAYS = {
    "configs/adaptation/dann_batchnorm.yaml": "configs/adaptation/mnist_to_mnistm.yaml",
    "configs/adaptation/dann_published.yaml": "configs/adaptation/mnist_to_mnistm.yaml",
    "configs/adaptation/source_only.yaml": "configs/adaptation/mnist_to_mnistm.yaml",
    "configs/adaptation/target_only.yaml": "configs/adaptation/mnist_to_mnistm.yaml",
    "configs/logger/wandb.yaml": "configs/quickstart.yaml",
}


def _class(path: str) -> type:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _image_tree(root: Path) -> Path:
    """``root/<class>/*.png``: the layout ImageFolderDataModule reads (2 classes, 3 images each)."""
    import numpy as np

    from fixtures.datasets import photo

    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        for i in range(3):
            photo(rng, (40, 40)).save(root / name / f"{i}.png")
    return root


def _cub(root: Path) -> str:
    from fixtures.datasets import write_cub

    return write_cub(root, class_ids=(1, 2, 3, 4, 5, 6, 7, 8, 9, 10), listed_classes=tuple(range(1, 11)))


FIXTURES = {"ImageFolderDataModule": _image_tree, "CUB200DataModule": _cub}


def _scalars(section: dict | None) -> dict:
    args = (section or {}).get("init_args", {}) or {}
    return {k: v for k, v in args.items() if isinstance(v, (bool, int, float, str))}


def test_every_config_that_is_not_a_full_run_is_a_registered_overlay():
    for config in CONFIGS:
        text = yaml.safe_load((REPO / config).read_text())
        full = "class_path" in (text.get("model") or {}) and "class_path" in (text.get("data") or {})
        assert full or config in OVERLAYS, f"{config} sets no model/data class: add it to OVERLAYS with its base"


def _assert_model_contract(model) -> None:
    """Every method exposes ``backbone`` (the module holding its timm model) and ``head`` (features -> one output
    per class), under those names, as the callbacks and speed switches reach them (issue 18)."""
    import torch

    assert not hasattr(model, "backbone_module")
    assert isinstance(model.backbone, torch.nn.Module) and isinstance(model.head, torch.nn.Module)
    assert any(hasattr(m, "pretrained_cfg") for m in model.backbone.modules()), type(model).__name__
    assert any(m is model.head for m in model.modules()) and any(m is model.backbone for m in model.modules())
    last = [m for m in model.head.modules() if isinstance(m, torch.nn.Linear)][-1]
    assert last.out_features == model.num_classes


@pytest.mark.parametrize("config", CONFIGS)
def test_config_builds_its_model_datamodule_and_trainer(config, tmp_path, monkeypatch):
    from tl_lightning.cli import run_cli as build

    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # a relative data_dir (../shared/data/...) must not find this machine's data

    layers = [OVERLAYS[config], config] if config in OVERLAYS else [config]
    merged: dict = {}
    for layer in layers:
        text = yaml.safe_load((REPO / layer).read_text())
        for key in ("model", "data"):
            if key in text:
                merged.setdefault(key, {}).setdefault("init_args", {}).update(text[key].get("init_args") or {})
                if "class_path" in text[key]:
                    merged[key]["class_path"] = text[key]["class_path"]
    args = [a for layer in layers for a in ("--config", str(REPO / layer))]
    # data sets read from disk when built (class names): a fixture in the official format, so no real data is
    # needed (the shipped CUB configs point at ../shared/data, which CI does not have)
    data_args, prefix = merged["data"]["init_args"], "--data.init_args"
    nested = data_args.get("dataset")  # a wrapper (class-incremental tasks) around a data set's DataModule
    if isinstance(nested, dict) and "class_path" in nested:
        data_class, prefix = nested["class_path"].rpartition(".")[2], f"{prefix}.dataset.init_args"
    else:
        data_class = merged["data"]["class_path"].rpartition(".")[2]
    if data_class in FIXTURES:
        args.append(f"{prefix}.data_dir={FIXTURES[data_class](tmp_path / 'data')}")
        data_args.pop("data_dir", None)
    cli = build([*args, "--trainer.accelerator=cpu", "--trainer.devices=1",
                 f"--trainer.default_root_dir={tmp_path / 'run'}"], run=False)
    assert isinstance(cli.model, _class(merged["model"]["class_path"]))
    assert isinstance(cli.datamodule, _class(merged["data"]["class_path"]))
    _assert_model_contract(cli.model)
    for key, value in _scalars(merged["model"]).items():  # the config's values reach the model
        if key in cli.model.hparams:
            assert cli.model.hparams[key] == value, key
    for key, value in _scalars(merged["data"]).items():  # and the DataModule
        if hasattr(cli.datamodule, key) and not callable(getattr(cli.datamodule, key)):
            assert getattr(cli.datamodule, key) == value, key
    if config == "configs/logger/wandb.yaml":
        from tl_lightning.loggers import WandbLogger

        assert any(isinstance(lg, WandbLogger) for lg in cli.trainer.loggers)
    # the CLI links what a model reads from its own arguments into the DataModule, and nothing for other methods
    declare = getattr(type(cli.model), "served_features", None)
    expected = declare(**cli.model.hparams) if declare else None
    if hasattr(cli.datamodule, "feature_weights"):  # class-incremental tasks: a frozen backbone's pooled features
        assert cli.datamodule.feature_weights == (expected or {}).get("weights")
    elif expected is None:
        assert getattr(cli.datamodule, "served_features", None) is None
    else:
        from tl_lightning.backbones import readout_key

        served = cli.datamodule.served_features
        assert served.weights == expected["weights"] and served.tta_views == expected["tta_views"]
        assert list(served.readouts) == [readout_key(r) for r in expected["readouts"]]
    if config in ("configs/feature_extraction/cub200.yaml", "configs/incremental/cub200.yaml"):
        assert expected is not None  # the real-data configs read a frozen backbone: its features are served
    if config == "configs/feature_extraction/cub200.yaml":
        assert list(cli.datamodule.served_features.readouts) == ["penultimate", "every_conv"]  # recipe: auto
