"""The six data sets on tiny fixtures in their official on-disk formats: shapes, labels, splits, class counts,
the missing-data and corrupt-file errors, MNIST's read-only unpacking, and a CLI run per task type."""
import os
import stat

import numpy as np
import pytest
import torch

from helpers import FAST, read_metrics, run_cli
from fixtures.datasets import (digit_level, write_cub, write_flowers102, write_mnist, write_mnistm,
                               write_svhn, write_voc2007)
from tl_lightning.data import (CUB200DataModule, Flowers102DataModule, MNISTDataModule, MNISTMDataModule,
                               SVHNDataModule, VOC2007DataModule)
from tl_lightning.data.mnist import MNIST_FILES
from tl_lightning.data.voc2007 import VOC_CLASSES
from tl_lightning.errors import DatasetNotFoundError, TLError

SMALL = dict(image_size=32, batch_size=4, num_workers=0)


def first_batch(dm, split="train"):
    loader = {"train": dm.train_dataloader, "val": dm.val_dataloader, "test": dm.test_dataloader}[split]()
    return next(iter(loader))


def assert_digits_aligned(dm, split):
    """Every fixture digit is filled with ``digit_level(label)``: images and labels must stay paired."""
    ds = dm.splits[split]
    for i in range(len(ds)):
        img = np.asarray(ds.source.load(int(ds.indices[i])))
        assert img.ndim == 3 and img.shape[2] == 3  # grey digits come as 3 channels
        assert img[14, 14, 0] == digit_level(ds.targets[i])


def split_sizes(dm):
    return {k: len(v) for k, v in dm.splits.items()}


# ----- MNIST ------------------------------------------------------------------------------------------------------
def test_mnist_gz_files_shapes_labels_splits(tmp_path):
    data = write_mnist(tmp_path / "d", n_train=60, n_test=20)
    dm = MNISTDataModule(data_dir=data, cache_dir=str(tmp_path / "cache"), **SMALL)
    dm.setup()
    assert dm.num_classes == 10 and dm.class_names[0] == "0"
    assert split_sizes(dm) == {"train": 50, "val": 10, "test": 20}  # one val digit per class carved out
    x, y = first_batch(dm)
    assert x.shape == (4, 3, 32, 32) and y.dtype == torch.long
    for split in ("train", "test"):
        assert_digits_aligned(dm, split)
    assert sorted(np.unique(dm.splits["test"].targets)) == list(range(10))


def test_mnist_unpacks_next_to_writable_gz_files(tmp_path):
    data = write_mnist(tmp_path / "d")
    dm = MNISTDataModule(data_dir=data, cache_dir=str(tmp_path / "cache"), **SMALL)
    dm.setup()
    assert all(os.path.isfile(os.path.join(data, "raw", n)) for n in MNIST_FILES)
    assert not os.path.exists(tmp_path / "cache" / "mnist")


def test_mnist_read_only_folder_unpacks_into_own_cache(tmp_path):
    data = write_mnist(tmp_path / "d")
    raw = os.path.join(data, "raw")
    os.chmod(raw, stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP)
    try:
        before = sorted(os.listdir(raw))
        dm = MNISTDataModule(data_dir=str(tmp_path / "d"), cache_dir=str(tmp_path / "cache"), **SMALL)  # parent dir
        dm.setup()
        assert sorted(os.listdir(raw)) == before  # nothing written into the data folder
        unpacked = [os.path.join(r, f) for r, _, fs in os.walk(tmp_path / "cache" / "mnist") for f in fs]
        assert sorted(os.path.basename(p) for p in unpacked) == sorted(MNIST_FILES)
        assert len(dm.splits["test"]) == 20
    finally:
        os.chmod(raw, stat.S_IRWXU)


def test_mnist_decompressed_files_and_raw_folder_as_data_dir(tmp_path):
    data = write_mnist(tmp_path / "d", compress=False)
    dm = MNISTDataModule(data_dir=os.path.join(data, "raw"), cache_dir=str(tmp_path / "cache"), **SMALL)
    dm.setup()
    assert len(dm.splits["test"]) == 20
    assert_digits_aligned(dm, "test")


def test_mnist_missing_and_corrupt_files(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"MNIST not found under .*t10k.*yann\.lecun\.com"):
        MNISTDataModule(data_dir=str(tmp_path), **SMALL).setup()
    data = write_mnist(tmp_path / "d")
    gz = os.path.join(data, "raw", "t10k-images-idx3-ubyte.gz")
    with open(gz, "r+b") as f:
        f.truncate(30)
    with pytest.raises(TLError, match="t10k-images-idx3-ubyte"):
        MNISTDataModule(data_dir=data, cache_dir=str(tmp_path / "cache"), **SMALL).setup()


def test_mnist_low_data_options_and_digit_augmentation(tmp_path):
    data = write_mnist(tmp_path / "d", n_train=100)
    dm = MNISTDataModule(data_dir=data, cache_dir=str(tmp_path / "c"), samples_per_class=2, augment=True, **SMALL)
    dm.setup()
    counts = np.bincount(dm.splits["train"].targets, minlength=10)
    assert counts.max() <= 2 and counts.sum() == len(dm.splits["train"])
    assert "RandomHorizontalFlip" not in repr(dm.splits["train"].transform)  # no flips for digits
    dm = MNISTDataModule(data_dir=data, cache_dir=str(tmp_path / "c"), train_fraction=0.5, **SMALL)
    dm.setup()
    assert abs(len(dm.splits["train"]) - 45) <= 5


# ----- SVHN -------------------------------------------------------------------------------------------------------
def test_svhn_label_10_is_zero_and_extra(tmp_path):
    data = write_svhn(tmp_path / "s", n_train=40, n_test=20, n_extra=15)
    dm = SVHNDataModule(data_dir=data, **SMALL)
    dm.setup()
    sizes = split_sizes(dm)
    assert sizes["train"] + sizes["val"] == 40 and sizes["val"] >= 4 and sizes["test"] == 20
    assert dm.splits["test"].targets.min() == 0 and dm.splits["test"].targets.max() == 9
    for split in ("train", "test"):
        assert_digits_aligned(dm, split)  # label 10 in y became 0 together with its digit-0 image
    x, _ = first_batch(dm, "test")
    assert x.shape == (4, 3, 32, 32)
    with_extra = SVHNDataModule(data_dir=data, extra=True, **SMALL)
    with_extra.setup()
    assert len(with_extra.splits["train"]) + len(with_extra.splits["val"]) == 55


def test_svhn_missing_corrupt_and_malformed_files(tmp_path):
    from scipy.io import savemat

    data = write_svhn(tmp_path / "s", n_train=20, n_test=10)
    with pytest.raises(DatasetNotFoundError, match=r"extra_32x32\.mat.*ufldl\.stanford\.edu"):
        SVHNDataModule(data_dir=data, extra=True, **SMALL).setup()
    train = os.path.join(data, "train_32x32.mat")
    with open(train, "wb") as f:  # truncated or not a MATLAB file
        f.write(b"MATLAB 5.0 MAT-file")
    with pytest.raises(TLError, match=r"cannot read '.*train_32x32\.mat'.*replace it with the official file"):
        SVHNDataModule(data_dir=data, **SMALL).setup()
    savemat(train, {"X": np.zeros((28, 28, 1, 3), np.uint8), "y": np.ones((3, 1))})  # MNIST-shaped
    with pytest.raises(TLError, match=r"is not an SVHN file: X must be \(32, 32, 3, N\) uint8.*got X \(28, 28, 1, 3\)"):
        SVHNDataModule(data_dir=data, **SMALL).setup()


# ----- Flowers102 ----------------------------------------------------------------------------------------------------
def test_flowers102_official_split_and_labels(tmp_path):
    from scipy.io import loadmat

    data = write_flowers102(tmp_path, n_classes=3, per_split=2, n_test=3)
    dm = Flowers102DataModule(data_dir=data, **SMALL)
    dm.setup()
    assert dm.num_classes == 102 and dm.class_names[0] == "pink primrose"
    assert split_sizes(dm) == {"train": 6, "val": 6, "test": 9}
    labels = loadmat(os.path.join(data, "flowers-102", "imagelabels.mat"))["labels"].ravel()
    setid = loadmat(os.path.join(data, "flowers-102", "setid.mat"))
    for split, key in (("train", "trnid"), ("val", "valid"), ("test", "tstid")):
        ds = dm.splits[split]
        ids = sorted(int(os.path.basename(ds.describe(i))[6:11]) for i in range(len(ds)))
        assert ids == sorted(setid[key].ravel().tolist())
        for i in range(len(ds)):
            image_id = int(os.path.basename(ds.describe(i))[6:11])
            assert ds.targets[i] == labels[image_id - 1] - 1  # 1-based in the .mat file
    x, y = first_batch(dm, "test")
    assert x.shape == (4, 3, 32, 32)
    # flowers-102/ itself works as data_dir too
    assert len(Flowers102DataModule(data_dir=os.path.join(data, "flowers-102"), **SMALL).build_split("val")) == 6


def test_flowers102_missing_incomplete_and_corrupt(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"setid\.mat.*robots\.ox\.ac\.uk"):
        Flowers102DataModule(data_dir=str(tmp_path), **SMALL).setup()
    data = write_flowers102(tmp_path / "f")
    os.remove(os.path.join(data, "flowers-102", "jpg", "image_00002.jpg"))
    with pytest.raises(DatasetNotFoundError, match=r"1 of \d+ files missing, first '.*image_00002\.jpg'"):
        Flowers102DataModule(data_dir=data, **SMALL).setup()
    setid = os.path.join(data, "flowers-102", "setid.mat")
    with open(setid, "wb") as f:
        f.write(b"not a mat file")
    with pytest.raises(TLError, match=r"cannot read the Flowers102 metadata .*replace imagelabels\.mat and setid\.mat"):
        Flowers102DataModule(data_dir=data, **SMALL).setup()
    from scipy.io import savemat
    savemat(setid, {"trnid": [[1, 99999]], "valid": [[1]], "tstid": [[1]]})  # an id past the last image
    with pytest.raises(TLError, match=r"do not match \(image ids must be 1\.\.\d+"):
        Flowers102DataModule(data_dir=data, **SMALL).setup()


# ----- CUB-200-2011 --------------------------------------------------------------------------------------------------
def test_cub_subset_classes_from_metadata(tmp_path):
    data = write_cub(tmp_path, class_ids=(2, 4, 5), listed_classes=(1, 2, 3, 4, 5), n_train=3, n_test=2)
    dm = CUB200DataModule(data_dir=str(tmp_path), **SMALL)  # the folder that holds CUB_200_2011/
    dm.setup()
    assert dm.class_names == ["Laysan_Albatross", "Groove_billed_Ani", "Crested_Auklet"]
    assert split_sizes(dm) == {"train": 6, "val": 3, "test": 6}
    for split in ("train", "val", "test"):
        ds = dm.splits[split]
        folders = [os.path.basename(os.path.dirname(ds.describe(i))) for i in range(len(ds))]
        assert [{"002": 0, "004": 1, "005": 2}[f[:3]] for f in folders] == ds.targets.tolist()
    x, y = first_batch(dm)
    assert x.shape == (4, 3, 32, 32) and int(y.max()) <= 2
    assert len(CUB200DataModule(data_dir=data, **SMALL).build_split("test")) == 6


def test_cub_crop_to_bounding_box(tmp_path):
    data = write_cub(tmp_path, image_size=(60, 40))
    plain = CUB200DataModule(data_dir=data, **SMALL).build_split("train")
    cropped = CUB200DataModule(data_dir=data, crop_to_bbox=True, **SMALL).build_split("train")
    assert plain.load(0).size == (60, 40)
    img = np.asarray(cropped.load(0)).astype(int)
    assert img.shape == (40, 30, 3)  # the box: the right half, painted red
    inner = img[:, 2:]  # JPEG blurs the box's first column into the photo beside it
    assert (inner[..., 0] > 230).all() and (inner[..., 1:] < 25).all()


def test_cub_missing_metadata_and_corrupt_image(tmp_path):
    data = write_cub(tmp_path)
    os.remove(os.path.join(data, "image_class_labels.txt"))
    with pytest.raises(DatasetNotFoundError, match=r"image_class_labels\.txt.*caltech\.edu"):
        CUB200DataModule(data_dir=data, **SMALL).setup()
    data = write_cub(tmp_path / "again")
    dm = CUB200DataModule(data_dir=data, **SMALL)
    dm.setup()
    bad = dm.splits["train"].describe(0)
    with open(bad, "wb") as f:
        f.write(b"not a jpeg")
    with pytest.raises(TLError, match=f"cannot decode image '{bad}'"):
        dm.splits["train"][0]


# ----- MNIST-M -------------------------------------------------------------------------------------------------------
def test_mnistm_carves_val_and_test_out_of_train(tmp_path):
    data = write_mnistm(tmp_path, n_train=50)
    dm = MNISTMDataModule(data_dir=str(tmp_path), test_fraction=0.2, val_fraction=0.1, **SMALL)
    dm.setup()
    sizes = split_sizes(dm)
    assert sum(sizes.values()) == 50 and sizes["test"] >= 10 and sizes["val"] >= 4
    paths = {s: {dm.splits[s].describe(i) for i in range(sizes[s])} for s in sizes}
    assert not (paths["train"] & paths["test"]) and not (paths["val"] & paths["test"])
    for split in sizes:
        assert_digits_aligned(dm, split)
    x, _ = first_batch(dm)
    assert x.shape == (4, 3, 32, 32)
    assert os.path.basename(data) == "mnist_m"


def test_mnistm_official_test_split_and_missing(tmp_path):
    data = write_mnistm(tmp_path, n_train=30, n_test=12)
    dm = MNISTMDataModule(data_dir=data, **SMALL)
    dm.setup()
    assert len(dm.splits["test"]) == 12 and len(dm.splits["train"]) + len(dm.splits["val"]) == 30
    assert all("mnist_m_test" in dm.splits["test"].describe(i) for i in range(12))
    with pytest.raises(DatasetNotFoundError, match=r"MNIST-M not found.*mnist_m_train_labels\.txt.*Ganin"):
        MNISTMDataModule(data_dir=str(tmp_path / "nothing"), **SMALL).setup()


# ----- PASCAL VOC 2007 -----------------------------------------------------------------------------------------------
def test_voc_multilabel_targets_difficult_and_splits(tmp_path):
    write_voc2007(tmp_path)
    dm = VOC2007DataModule(data_dir=str(tmp_path), **SMALL)
    dm.setup()
    assert dm.multilabel and dm.num_classes == 20 and dm.class_names == VOC_CLASSES
    assert split_sizes(dm) == {"train": 4, "val": 3, "test": 3}
    ds = dm.splits["train"]
    by_id = {os.path.basename(ds.describe(i))[:-4]: ds.targets[i] for i in range(len(ds))}
    c = VOC_CLASSES.index
    assert by_id["000001"][[c("dog"), c("person")]].tolist() == [1, 1] and by_id["000001"].sum() == 2
    assert by_id["000002"][c("cat")] == -1 and by_id["000002"][c("dog")] == 1  # cat only difficult
    assert by_id["000003"][c("car")] == 1  # one difficult + one plain car
    val = dm.splits["val"]
    bird_only = [val.targets[i] for i in range(len(val)) if val.describe(i).endswith("000006.jpg")][0]
    assert bird_only[c("bird")] == -1 and (np.delete(bird_only, c("bird")) == 0).all()
    x, y = first_batch(dm)
    assert x.shape == (4, 3, 32, 32) and y.shape == (4, 20) and y.dtype == torch.float32


def test_voc_trainval_carves_validation(tmp_path):
    write_voc2007(tmp_path)
    dm = VOC2007DataModule(data_dir=os.path.join(tmp_path, "VOCdevkit"), train_split="trainval",
                           val_fraction=0.3, **SMALL)
    dm.setup()
    assert len(dm.splits["train"]) + len(dm.splits["val"]) == 7 and len(dm.splits["val"]) == 2
    assert len(dm.splits["test"]) == 3


def test_voc_missing_data_and_missing_test_set(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"PASCAL VOC 2007 not found.*Annotations.*VOCtest_06-Nov-2007"):
        VOC2007DataModule(data_dir=str(tmp_path), **SMALL).setup()
    write_voc2007(tmp_path, sets={"train": ["000001"], "val": ["000002"]})
    with pytest.raises(DatasetNotFoundError, match=r"test\.txt"):
        VOC2007DataModule(data_dir=str(tmp_path), **SMALL).setup()


@pytest.mark.parametrize("cls", [CUB200DataModule, MNISTDataModule, VOC2007DataModule])
def test_unreachable_download_is_one_sentence(tmp_path, monkeypatch, cls):
    # the upstream is unreachable (a proxy on a closed local port, so the test behaves the same online):
    # the real download code path fails with the manual instructions
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(TLError, match=r"could not download .* by hand and point --data.data_dir at it\.$"):
        cls(data_dir=str(tmp_path), download=True, **SMALL).setup()


# ----- through the CLI -----------------------------------------------------------------------------------------------
def test_cli_voc_feature_extraction_logs_both_maps(tmp_path):
    write_voc2007(tmp_path / "voc")
    run_dir = tmp_path / "run"
    run_cli("fit", "--config", "configs/feature_extraction/voc2007.yaml", *FAST,
            f"--data.data_dir={tmp_path / 'voc'}", "--data.image_size=32", "--data.batch_size=4",
            "--trainer.max_epochs=2", f"--trainer.default_root_dir={run_dir}",
            f"--model.init_args.cache_dir={tmp_path / 'cache'}")
    results = read_metrics(run_dir)
    metrics = results["metrics"]
    for key in ("test/mAP", "test/mAP_voc07", "val/mAP", "val/mAP_voc07"):
        assert 0.0 <= metrics[key] <= 1.0
    selection = results["recipe_selection"]  # the shipped config's recipe: auto selects on validation mAP
    assert selection["metric"] == "val/mAP" and len(selection["candidates"]) == 8
    assert selection["val_score"] == max(c["val_score"] for c in selection["candidates"])


def test_cli_mnist_config_on_fixture(tmp_path):
    data = write_mnist(tmp_path / "d", n_train=60, n_test=20)
    run_dir = tmp_path / "run"
    run_cli("fit", "--config", "configs/feature_extraction/mnist.yaml", *FAST, f"--data.data_dir={data}",
            "--data.image_size=32", "--data.samples_per_class=null", f"--data.cache_dir={tmp_path / 'cache'}",
            "--trainer.max_epochs=2", f"--trainer.default_root_dir={run_dir}")
    metrics = read_metrics(run_dir)["metrics"]
    assert 0.0 <= metrics["test/acc"] <= 1.0 and "val/acc" in metrics


CONFIGS = [f"configs/feature_extraction/{n}.yaml" for n in ("voc2007", "flowers102", "cub200", "mnist", "mnistm",
                                                              "svhn")] + \
          [f"configs/finetune/{n}.yaml" for n in ("mnist", "mnistm", "svhn")]


@pytest.mark.parametrize("config", CONFIGS)
def test_config_parses_with_data_dir_override(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli("fit", "--config", config, "--data.data_dir=/somewhere/else", "--print_config")
    assert exit_info.value.code in (0, None)
    assert "data_dir: /somewhere/else" in capsys.readouterr().out
