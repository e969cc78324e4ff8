"""Bring-your-own-data: image-folder and CSV DataModules, the data report, predict's CSV, and the wrappers.

Every test writes a tiny tree of real PNG/JPEG files (a colour per class plus noise, 16-24 px).
"""
from __future__ import annotations

import csv
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from helpers import FAST, REPO, read_metrics, run_cli
from tl_lightning.data import CSVDataModule, ImageFolderDataModule
from tl_lightning.data.report import DataReportWarning
from tl_lightning.errors import TLError

COLOURS = {"rose": (220, 30, 30), "tulip": (240, 220, 40), "violet": (110, 40, 200)}


def write_image(path: Path, colour, seed: int, size: int = 20) -> Path:
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.asarray(colour) + rng.normal(0, 15, (size, size, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def write_tree(root: Path, counts: dict, start: int = 0) -> list[Path]:
    """``root/<class>/<i>.png|jpg`` with ``counts[class]`` images each (alternating formats)."""
    files = []
    for c, n in counts.items():
        for i in range(start, start + n):
            name = f"{c}_{i}.{'png' if i % 2 else 'jpg'}"
            files.append(write_image(root / c / name, COLOURS[c], seed=1000 * list(COLOURS).index(c) + i))
    return files


def module(cls, **kwargs):
    kwargs = {"image_size": 32, "num_workers": 0, "batch_size": 8, **kwargs}
    return cls(**kwargs)


def files_per_class(ds, classes) -> dict:
    return {c: int((ds.targets == i).sum()) for i, c in enumerate(classes)}


def setup_quietly(dm, stage="fit"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataReportWarning)
        dm.setup(stage)
    return dm


# ----- image folders -----------------------------------------------------------------------------------------
def test_single_tree_is_split_stratified_with_the_seed(tmp_path):
    files = write_tree(tmp_path / "flowers", {"rose": 20, "tulip": 12, "violet": 8})
    dm = setup_quietly(module(ImageFolderDataModule, data_dir=str(tmp_path / "flowers"), val_fraction=0.2,
                              test_fraction=0.25, seed=3))
    assert dm.classes == ["rose", "tulip", "violet"] and dm.num_classes == 3 and not dm.multilabel
    # test: round(0.25 n) per class; val: round(0.2 n) of the rest
    assert files_per_class(dm.splits["test"], dm.classes) == {"rose": 5, "tulip": 3, "violet": 2}
    assert files_per_class(dm.splits["val"], dm.classes) == {"rose": 3, "tulip": 2, "violet": 1}
    assert files_per_class(dm.splits["train"], dm.classes) == {"rose": 12, "tulip": 7, "violet": 5}
    parts = {s: {ds.describe(i) for i in range(len(ds))} for s, ds in dm.splits.items()}
    assert not (parts["train"] & parts["val"] or parts["train"] & parts["test"] or parts["val"] & parts["test"])
    assert set.union(*parts.values()) == {str(f) for f in files}
    for s, ds in dm.splits.items():  # each file's label is its folder
        assert all(Path(ds.describe(i)).parent.name == dm.classes[t] for i, t in enumerate(ds.targets))
    again = setup_quietly(module(ImageFolderDataModule, data_dir=str(tmp_path / "flowers"), val_fraction=0.2,
                                 test_fraction=0.25, seed=3))
    other = setup_quietly(module(ImageFolderDataModule, data_dir=str(tmp_path / "flowers"), val_fraction=0.2,
                                 test_fraction=0.25, seed=4))
    assert np.array_equal(again.splits["test"].indices, dm.splits["test"].indices)
    assert not np.array_equal(other.splits["test"].indices, dm.splits["test"].indices)


def test_split_folders_are_used_and_missing_ones_carved(tmp_path, capsys):
    root = tmp_path / "data"
    write_tree(root / "train", {"rose": 10, "tulip": 10, "violet": 10})
    write_tree(root / "valid", {"rose": 3, "tulip": 2}, start=100)  # 'valid' is an accepted name; no violet
    dm = module(ImageFolderDataModule, data_dir=str(root), test_fraction=0.2)
    with pytest.warns(DataReportWarning, match=r"no images in the val split: 'violet'"):
        dm.setup("fit")
    assert dm.classes == ["rose", "tulip", "violet"]
    assert files_per_class(dm.splits["val"], dm.classes) == {"rose": 3, "tulip": 2, "violet": 0}
    assert files_per_class(dm.splits["test"], dm.classes) == {"rose": 2, "tulip": 2, "violet": 2}  # carved
    assert files_per_class(dm.splits["train"], dm.classes) == {"rose": 8, "tulip": 8, "violet": 8}
    assert all("/valid/" in dm.splits["val"].describe(i) for i in range(len(dm.splits["val"])))
    table = capsys.readouterr().out
    assert "Data report: ImageFolderDataModule, 3 classes" in table
    assert "smallest class: 'rose' (8 training images)" in table
    assert dm.data_report.missing == {"val": ["violet"]}


@pytest.mark.parametrize("layout, message", [
    ({"train/rose": 1, "roses": 1}, "mixes split folders"),
    ({"val/rose": 1}, "no 'train' folder"),
    ({}, "no class folders"),
    ({"rose": 0}, "no images in the class folders"),
])
def test_image_folder_layout_errors(tmp_path, layout, message):
    root = tmp_path / "data"
    root.mkdir()
    for folder, n in layout.items():
        (root / folder).mkdir(parents=True)
        for i in range(n):
            write_image(root / folder / f"{i}.png", (0, 0, 0), i)
    with pytest.raises(TLError, match=message):
        module(ImageFolderDataModule, data_dir=str(root)).setup("fit")
    with pytest.raises(TLError, match="set --data.data_dir"):
        module(ImageFolderDataModule).classes
    with pytest.raises(TLError, match="does not exist"):
        module(ImageFolderDataModule, data_dir=str(tmp_path / "nowhere")).classes


# ----- CSV files -----------------------------------------------------------------------------------------------
def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_csv_labels_split_column_and_paths(tmp_path):
    images = tmp_path / "set"
    write_tree(images / "img", {"rose": 6, "tulip": 6})
    rows = []
    for i, f in enumerate(sorted((images / "img").rglob("*.*"))):
        label = {"rose": "2", "tulip": "10"}[f.parent.name]  # numeric names sort as numbers
        split = ["train", "train", "train", "valid", "test", "train"][i % 6]
        path = str(f) if i == 0 else str(f.relative_to(images))  # absolute and relative paths
        rows.append([path, label, split])
    table = write_csv(images / "labels.csv", ["file", "species", "split"], rows)
    dm = setup_quietly(module(CSVDataModule, csv_file=str(table), path_column="file", label_column="species",
                              split_column="split"))
    assert dm.classes == ["2", "10"] and not dm.multilabel
    assert {s: len(ds) for s, ds in dm.splits.items()} == {"train": 8, "val": 2, "test": 2}
    for ds in dm.splits.values():
        for i, t in enumerate(ds.targets):
            assert os.path.isfile(ds.describe(i))
            assert {"rose": 0, "tulip": 1}[Path(ds.describe(i)).parent.name] == t
    # data_dir overrides the CSV's folder as the root of relative paths
    moved = write_csv(tmp_path / "elsewhere.csv", ["file", "species"], [[r[0], r[1]] for r in rows])
    dm = setup_quietly(module(CSVDataModule, csv_file=str(moved), data_dir=str(images), path_column="file",
                              label_column="species", test_fraction=0.25, val_fraction=0.0))
    assert len(dm.splits["test"]) == 4 and len(dm.splits["train"]) == 8 and not dm.data_report.unreadable
    with pytest.raises(TLError, match=r"column\(s\) label not in .*fix --data.label_column"):
        module(CSVDataModule, csv_file=str(table), path_column="file").classes
    bad_split = write_csv(tmp_path / "bad.csv", ["path", "label", "split"], [["a.png", "x", "training"]])
    with pytest.raises(TLError, match="line 2 .* split 'training' is not one of"):
        module(CSVDataModule, csv_file=str(bad_split), split_column="split").setup("fit")


def test_csv_multilabel_by_separator_and_by_columns(tmp_path):
    files = write_tree(tmp_path, {"rose": 4, "tulip": 4, "violet": 4})
    labels = {"rose": "rose", "tulip": "tulip;rose", "violet": "violet"}
    table = write_csv(tmp_path / "tags.csv", ["path", "label"],
                      [[f.relative_to(tmp_path), labels[f.parent.name]] for f in files])
    dm = setup_quietly(module(CSVDataModule, csv_file=str(table), label_separator=";", val_fraction=0.25,
                              test_fraction=0.25))
    assert dm.multilabel and dm.classes == ["rose", "tulip", "violet"]
    train = dm.splits["train"]
    x, y = train[0]
    assert x.shape == (3, 32, 32) and y.dtype == torch.float32 and y.shape == (3,)
    expected = {"rose": [1, 0, 0], "tulip": [1, 1, 0], "violet": [0, 0, 1]}
    for i in range(len(train)):
        assert train.targets[i].tolist() == expected[Path(train.describe(i)).parent.name]
    assert sum(len(ds) for ds in dm.splits.values()) == 12
    # one 1/0/-1 column per class; empty = unknown (-1, ignored)
    flags = {"rose": ("1", "0"), "tulip": ("0", "1"), "violet": ("0", "")}
    onehot = write_csv(tmp_path / "cols.csv", ["path", "red", "yellow"],
                       [[f.relative_to(tmp_path), *flags[f.parent.name]] for f in files])
    dm = setup_quietly(module(CSVDataModule, csv_file=str(onehot), label_columns=["red", "yellow"]))
    assert dm.multilabel and dm.class_names == ["red", "yellow"] and dm.num_classes == 2
    targets = np.concatenate([ds.targets for ds in dm.splits.values()])
    assert sorted(map(tuple, targets.tolist())) == sorted([(1.0, 0.0)] * 4 + [(0.0, 1.0)] * 4 + [(0.0, -1.0)] * 4)


# ----- data report -------------------------------------------------------------------------------------------
def test_corrupt_files_are_reported_with_their_paths(tmp_path, capsys):
    root = tmp_path / "flowers"
    write_tree(root, {"rose": 6, "tulip": 6})
    good = root / "rose" / "rose_0.jpg"
    truncated = root / "rose" / "cut.jpg"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    garbage = root / "tulip" / "notes.png"
    garbage.write_bytes(b"this is not a png")
    dm = module(ImageFolderDataModule, data_dir=str(root))
    with pytest.warns(DataReportWarning) as caught:
        dm.setup("fit")
    message = " ".join(str(w.message) for w in caught)
    assert "2 image file(s)" in message and str(truncated) in message and str(garbage) in message
    assert set(dm.data_report.unreadable) == {str(truncated), str(garbage)}
    served = {ds.describe(i) for ds in dm.splits.values() for i in range(len(ds))}
    assert len(served) == 12 and str(truncated) not in served and str(garbage) not in served
    for ds in dm.splits.values():  # every file left decodes: nothing fails mid-epoch
        for i in range(len(ds)):
            assert ds[i][0].shape == (3, 32, 32)
    out = capsys.readouterr().out
    assert "unreadable files: 2 (left out)" in out and "rose" in out and "tulip" in out
    with pytest.raises(TLError, match=f"2 image file\\(s\\) cannot be decoded: .*{truncated.name}"):
        module(ImageFolderDataModule, data_dir=str(root), bad_images="fail").setup("fit")
    # the check is cached by path, size and mtime: a repaired file is seen as repaired
    write_image(garbage, COLOURS["tulip"], 99)
    with pytest.warns(DataReportWarning, match="1 image file"):
        dm = module(ImageFolderDataModule, data_dir=str(root))
        dm.setup("fit")
    assert list(dm.data_report.unreadable) == [str(truncated)]
    # a CSV row naming a file that does not exist is reported the same way
    table = write_csv(tmp_path / "list.csv", ["path", "label"],
                      [["flowers/rose/rose_1.png", "rose"], ["flowers/rose/gone.png", "rose"],
                       ["flowers/tulip/tulip_1.png", "tulip"], ["flowers/tulip/tulip_2.jpg", "tulip"]])
    dm = module(CSVDataModule, csv_file=str(table), val_fraction=0.0, test_fraction=0.0)
    with pytest.warns(DataReportWarning, match="gone.png"):
        dm.setup("fit")
    assert list(dm.data_report.unreadable) == [str(tmp_path / "flowers/rose/gone.png")]
    assert "FileNotFoundError" in dm.data_report.unreadable[str(tmp_path / "flowers/rose/gone.png")]


def test_report_works_for_any_datamodule_and_summarises_many_classes(capsys):
    from tl_lightning.data import DigitsDataModule
    from tl_lightning.data.report import DataReport

    digits = DigitsDataModule(image_size=32, num_workers=0, report=True)
    digits.setup("fit")  # in-memory images: counted, nothing to decode
    assert sum(digits.data_report.counts["test"]) == len(digits.splits["test"])
    assert digits.data_report.counts["train"] == np.bincount(digits.splits["train"].targets).tolist()
    assert "Data report: DigitsDataModule, 10 classes" in capsys.readouterr().out
    classes = [f"species_{i:02d}" for i in range(45)]
    counts = {"train": [5] * 44 + [1], "val": [1] * 44 + [0]}
    report = DataReport("mine", classes, counts)
    table = report.table()
    rows = [line.split(" ")[0] for line in table.splitlines()]
    assert "(6 more classes)" in table and "species_38" in rows and "species_39" not in rows and len(rows) < 60
    assert "smallest class: 'species_44' (1 training images)" in table
    assert report.smallest == ("species_44", 1) and report.missing == {"val": ["species_44"]}
    multi = DataReport.of("tags", ["a", "b"], {"train": type("S", (), {"targets": np.array([[1, -1], [1, 1.0]])})})
    assert multi.counts == {"train": [2, 1]}


def test_shared_behaviour_transforms_augment_and_samples_per_class(tmp_path):
    write_tree(tmp_path, {"rose": 10, "tulip": 10, "violet": 10})
    dm = setup_quietly(module(ImageFolderDataModule, data_dir=str(tmp_path), image_size=48, samples_per_class=3,
                              report=False))
    assert dm.data_report is None  # the report can be switched off
    assert files_per_class(dm.splits["train"], dm.classes) == {"rose": 3, "tulip": 3, "violet": 3}
    x, _ = dm.splits["train"][0]
    assert x.shape == (3, 48, 48) and x.min() < 0  # resized and normalised
    assert dm.deterministic_train
    # the input size follows the backbone (linked from the model) unless image_size overrides it
    for backbone, size in (("digit_cnn", 32), ("tf_efficientnet_lite0", 224)):
        x, _ = setup_quietly(module(ImageFolderDataModule, data_dir=str(tmp_path), backbone=backbone,
                                    image_size=None)).splits["val"][0]
        assert x.shape == (3, size, size)
    aug = setup_quietly(module(ImageFolderDataModule, data_dir=str(tmp_path), augment=True))
    assert not aug.deterministic_train and "RandomResizedCrop" in repr(aug.splits["train"].transform)
    assert "RandomResizedCrop" not in repr(aug.splits["val"].transform)
    crop = next(t for t in aug.splits["train"].transform.transforms if type(t).__name__.startswith("RandomResizedCrop"))
    assert crop.scale == (0.08, 1.0)  # the data set's default
    milder = setup_quietly(module(ImageFolderDataModule, data_dir=str(tmp_path), augment=True,
                                  augment_scale=[0.35, 1.0]))
    crop = next(t for t in milder.splits["train"].transform.transforms if type(t).__name__.startswith("RandomResizedCrop"))
    assert crop.scale == (0.35, 1.0) and ImageFolderDataModule.augment_scale == (0.08, 1.0)
    with pytest.raises(TLError, match=r"augment_scale must be .*--data.augment_scale=\[0.35,1.0\]"):
        module(ImageFolderDataModule, data_dir=str(tmp_path), augment_scale=[0.5, 0.2])


# ----- the CLI: fit, metrics.json, predict -------------------------------------------------------------------
def test_fit_then_predict_writes_csv_with_class_names(tmp_path):
    data = tmp_path / "flowers"
    write_tree(data, {"rose": 8, "tulip": 8, "violet": 8})
    run = tmp_path / "run"
    common = ("--config", REPO / "configs/feature_extraction/image_folder.yaml", f"--data.data_dir={data}",
              "--data.image_size=32", f"--trainer.default_root_dir={run}", *FAST)
    run_cli("fit", *common, "--trainer.max_epochs=2")
    metrics = read_metrics(run)
    assert metrics["class_names"] == ["rose", "tulip", "violet"]
    assert metrics["data_report"]["images_per_class"]["test"] == [2, 2, 2]
    new = tmp_path / "new"
    write_image(new / "a.png", COLOURS["violet"], 1)
    write_image(new / "nested" / "b.JPG", COLOURS["rose"], 2)
    (new / "readme.txt").write_text("not an image")
    (new / "broken.jpg").write_bytes(b"\xff\xd8 broken")
    with pytest.warns(DataReportWarning, match="broken.jpg"):
        run_cli("predict", *common, "--ckpt_path", run / "checkpoints" / "last.ckpt", f"--data.predict_dir={new}")
    with open(run / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["file"] for r in rows] == [str(new / "a.png"), str(new / "nested" / "b.JPG")]
    for r in rows:
        assert r["class"] in metrics["class_names"] and 1 / 3 <= float(r["score"]) <= 1


def test_finetune_config_trains_on_own_data(tmp_path):
    data = tmp_path / "flowers"
    write_tree(data, {"rose": 6, "tulip": 6})
    run = tmp_path / "run"
    run_cli("fit", "--config", REPO / "configs/finetune/image_folder.yaml", f"--data.data_dir={data}",
            "--data.image_size=32", "--trainer.max_epochs=1", f"--trainer.default_root_dir={run}", *FAST)
    metrics = read_metrics(run)
    assert metrics["class_names"] == ["rose", "tulip"] and "test/acc" in metrics["metrics"]
    assert metrics["data_report"]["images_per_class"]["train"] == [4, 4]


# ----- the domain-adaptation and class-incremental wrappers ---------------------------------------------------
def test_domain_pair_accepts_folder_source_and_csv_target(tmp_path):
    from tl_lightning.data.domains import DomainPairDataModule

    write_tree(tmp_path / "photos", {"rose": 8, "tulip": 8})
    sketches = write_tree(tmp_path / "sketches", {"rose": 8, "tulip": 8}, start=50)
    table = write_csv(tmp_path / "sketches.csv", ["path", "label"],
                      [[f.relative_to(tmp_path), f.parent.name] for f in sketches])
    pair = DomainPairDataModule(source=module(ImageFolderDataModule, data_dir=str(tmp_path / "photos")),
                                target=module(CSVDataModule, csv_file=str(table)), labelled_per_class=1,
                                batch_size=4, num_workers=0, image_size=32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataReportWarning)
        pair.setup("fit")
    assert pair.class_names == ["rose", "tulip"] and pair.num_classes == 2
    sizes = pair.sizes()
    assert sizes["target_labelled"] == 2 and sizes["source_train"] == 10
    batch = next(iter(pair.train_dataloader()))
    batch = batch[0] if isinstance(batch, tuple) else batch
    assert batch["source"][0].shape == (4, 3, 32, 32) and batch["target_unlabelled"].shape[1:] == (3, 32, 32)
    target_val, source_val = pair.val_dataloader()
    assert "sketches" in target_val.dataset.describe(0) and "photos" in source_val.dataset.describe(0)


def test_class_incremental_accepts_image_folder(tmp_path):
    from tl_lightning.data.incremental import ClassIncrementalDataModule

    write_tree(tmp_path, {"rose": 6, "tulip": 6, "violet": 6})
    inc = ClassIncrementalDataModule(module(ImageFolderDataModule, data_dir=str(tmp_path), val_fraction=0.0,
                                            test_fraction=0.34), classes_per_task=1,
                                     class_order=["violet", "rose", "tulip"])
    setup_quietly(inc)
    assert inc.num_tasks == 3 and inc.class_names == ["violet", "rose", "tulip"]
    first = inc.task_split("train", 0)
    assert len(first) == 4 and all("/violet/" in first.describe(i) for i in range(len(first)))
    assert set(inc.task_split("test", 1).targets.tolist()) == {0, 1}
    files = write_tree(tmp_path / "tags", {"rose": 2})
    table = write_csv(tmp_path / "tags.csv", ["path", "label"], [[f, "a;b"] for f in files])
    with pytest.raises(TLError, match="multi-label"):
        ClassIncrementalDataModule(module(CSVDataModule, csv_file=str(table), label_separator=";"))


def test_adaptation_and_icarl_run_on_own_data_from_the_cli(tmp_path):
    """Both wrappers, end to end through their methods: DomainAdaptation (folder -> CSV) and ICaRL (folder)."""
    write_tree(tmp_path / "photos", {"rose": 6, "tulip": 6})
    sketches = write_tree(tmp_path / "sketches", {"rose": 6, "tulip": 6}, start=50)
    table = write_csv(tmp_path / "sketches.csv", ["path", "label"],
                      [[f.relative_to(tmp_path), f.parent.name] for f in sketches])
    adaptation = {
        "model": {"class_path": "tl_lightning.methods.DomainAdaptation",
                  "init_args": {"backbone": "digit_cnn", "weights": "none", "mode": "adapt"}},
        "data": {"class_path": "tl_lightning.data.domains.DomainPairDataModule",
                 "init_args": {"labelled_per_class": 1, "batch_size": 4, "image_size": 32, "num_workers": 0,
                               "source": {"class_path": "tl_lightning.data.ImageFolderDataModule",
                                          "init_args": {"data_dir": str(tmp_path / "photos"), "num_workers": 0}},
                               "target": {"class_path": "tl_lightning.data.CSVDataModule",
                                          "init_args": {"csv_file": str(table), "num_workers": 0}}}},
    }
    incremental = {
        "model": {"class_path": "tl_lightning.methods.ICaRL",
                  "init_args": {"backbone": "digit_cnn", "weights": "none", "epochs_per_task": 1,
                                "memory_budget": 4}},
        "data": {"class_path": "tl_lightning.data.incremental.ClassIncrementalDataModule",
                 "init_args": {"classes_per_task": 1,
                               "dataset": {"class_path": "tl_lightning.data.ImageFolderDataModule",
                                           "init_args": {"data_dir": str(tmp_path / "photos"), "num_workers": 0,
                                                         "batch_size": 4, "image_size": 32}}}},
        "trainer": {"reload_dataloaders_every_n_epochs": 1},  # the task switches at epoch boundaries
    }
    for name, config in (("adaptation", adaptation), ("incremental", incremental)):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        run = tmp_path / f"run_{name}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DataReportWarning)
            flags = [f for f in FAST if not f.startswith("--data.")]  # workers are set per DataModule above
            run_cli("fit", "--config", path, "--trainer.max_epochs=2", f"--trainer.default_root_dir={run}", *flags)
        metrics = read_metrics(run)
        assert sorted(metrics["class_names"]) == ["rose", "tulip"], name
