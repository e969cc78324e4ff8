"""Class-incremental splits of any classification DataModule (the protocol of iCaRL, Rebuffi et al. CVPR 2017).

The wrapped data set's classes are put in an order (a seeded permutation or an explicit list) and cut into
tasks: ``initial_classes`` first (default ``classes_per_task``), then ``classes_per_task`` at a time. Labels
are renumbered to positions in that order, so the classes of task ``t`` are a contiguous range and "the classes
seen so far" are ``0 .. seen-1``.

Per task ``t``: **train** holds the task's new classes plus the exemplar memory (positions into the full
training split); **val** and **test** hold every class seen so far. The task served and the memory are set by
the Trainer-side schedule (``callbacks.task_schedule.TaskSchedule`` calls :meth:`set_task`) and saved in
checkpoints (``state_dict``), so ``validate``/``test`` of a checkpoint serve the task it was in. ``joint=True``
trains each task on all the data of the classes seen so far (the upper bound). Loaders come from the wrapped
DataModule (its batch size, workers and transforms).

``serve_features`` (``{weights: ...}``, linked by the CLI from a model whose backbone is frozen:
``ICaRL.served_features``) serves, instead of images, the pooled features of ``backbone`` with those weights
(``backbone_features``: extracted once per split and cached).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np

from tl_lightning.data.base import SampleSet, Source, TLDataModule, per_class_subset
from tl_lightning.data.served_features import images_only
from tl_lightning.errors import TLError


class RelabeledSource(Source):
    """A source whose labels are renumbered by ``mapping`` (original label -> position in the class order;
    -1 for a class left out)."""

    def __init__(self, source: Source, mapping: np.ndarray):
        self.source = source
        self.mapping = np.asarray(mapping, dtype=np.int64)
        self.targets = self.mapping[np.asarray(source.targets, dtype=np.int64)]

    def load(self, index: int):
        return self.source.load(index)

    def identity(self) -> str:
        return f"{self.source.identity()}|order:{','.join(map(str, self.mapping.tolist()))}"

    def describe(self, index: int) -> str:
        return self.source.describe(index)


def resolve_class_order(classes: list[str], class_order: Optional[Sequence[Union[int, str]]], seed: int) -> list[int]:
    """Original class indices in incremental order: ``class_order`` (indices or names, a subset allowed) or a
    permutation of all classes drawn with ``seed``."""
    if class_order is None:
        return np.random.default_rng(seed).permutation(len(classes)).tolist()
    order = []
    for c in class_order:
        if isinstance(c, str) and not c.lstrip("-").isdigit():
            if c not in classes:
                raise TLError(f"class_order names class '{c}', which the data set does not have; use names from "
                              f"{classes[:5]}... or indices 0..{len(classes) - 1}.")
            order.append(classes.index(c))
        else:
            i = int(c)
            if not 0 <= i < len(classes):
                raise TLError(f"class_order index {i} is out of range; the data set has classes 0..{len(classes) - 1}.")
            order.append(i)
    if len(set(order)) != len(order):
        raise TLError("class_order lists a class twice; give each class once.")
    return order


class ClassIncrementalDataModule(TLDataModule):
    """Tasks of ``classes_per_task`` new classes each over a wrapped :class:`TLDataModule` (see module doc)."""

    def __init__(
        self,
        dataset: TLDataModule,
        classes_per_task: int = 2,
        initial_classes: Optional[int] = None,
        class_order: Optional[list[Union[int, str]]] = None,
        class_order_seed: int = 0,
        joint: bool = False,
        eval_samples_per_class: Optional[int] = None,
        batch_size: Optional[int] = None,
        num_workers: Optional[int] = None,
        backbone: Optional[str] = None,
        serve_features: Optional[dict] = None,
    ):
        """
        Args:
            dataset: the classification DataModule to split (``class_path``/``init_args``).
            classes_per_task: new classes per task.
            initial_classes: classes of the first task (default ``classes_per_task``).
            class_order: explicit class order (indices or names; a subset of the classes is allowed).
            class_order_seed: seed of the random class order when ``class_order`` is not given.
            joint: train each task on all data of the classes seen so far (upper bound) instead of new classes
                plus exemplars.
            eval_samples_per_class: keep at most this many val and test samples per class (quick runs).
            batch_size: override the wrapped DataModule's batch size.
            num_workers: override the wrapped DataModule's loader processes.
            backbone: linked from the model; passed to the wrapped DataModule (input size and normalisation).
            serve_features: ``{weights: ...}``: serve the pooled features of ``backbone`` with these weights
                instead of images, extracted once and cached. The CLI fills it in from the model
                (``ICaRL.served_features``: a frozen backbone), so configs leave it out. An augmented data set
                is served as images.
        """
        if serve_features is not None and set(serve_features) != {"weights"}:
            images_only(serve_features, self.__class__.__name__ + " (it serves pooled features only)")
        if dataset.multilabel:
            raise TLError(f"{dataset.__class__.__name__} is multi-label; class-incremental learning needs "
                          "single-label classification data.")
        if classes_per_task < 1 or (initial_classes is not None and initial_classes < 1):
            raise TLError("classes_per_task and initial_classes must be >= 1; fix --data.classes_per_task.")
        for name, value in (("backbone", backbone), ("batch_size", batch_size), ("num_workers", num_workers)):
            if value is not None:
                setattr(dataset, name, value)
        super().__init__(data_dir=dataset.data_dir, batch_size=dataset.batch_size, num_workers=dataset.num_workers,
                         seed=dataset.seed, backbone=dataset.backbone, image_size=dataset.image_size,
                         cache_dir=dataset.cache_dir)
        self.dataset = dataset
        self.classes_per_task = classes_per_task
        self.initial_classes = initial_classes or classes_per_task
        self.class_order_seed = class_order_seed
        self.joint = joint
        self.eval_samples_per_class = eval_samples_per_class
        #: the weights whose features are served (None: images, also when the data set is augmented)
        self.feature_weights = serve_features["weights"] if serve_features and dataset.deterministic_train else None
        #: the identity of the weights the served features were read with (None: images are served)
        self.feature_weights_id: Optional[str] = None
        self.order = resolve_class_order(dataset.classes, class_order, class_order_seed)
        rest = len(self.order) - self.initial_classes
        if rest < 0 or rest % classes_per_task:
            raise TLError(f"{len(self.order)} classes do not split into a first task of {self.initial_classes} and "
                          f"tasks of {classes_per_task}; change classes_per_task, initial_classes or class_order.")
        #: the task whose training data is served, and the exemplar positions replayed with it
        self.task = 0
        self.memory_positions = np.zeros(0, dtype=np.int64)

    # ----- the task structure ---------------------------------------------------------------------------------
    @property
    def classes(self) -> list[str]:
        names = self.dataset.classes
        return [names[i] for i in self.order]

    @property
    def num_tasks(self) -> int:
        return 1 + (len(self.order) - self.initial_classes) // self.classes_per_task

    def task_classes(self, task: int) -> range:
        """Labels (positions in the class order) that task ``task`` introduces."""
        if task == 0:
            return range(0, self.initial_classes)
        start = self.initial_classes + (task - 1) * self.classes_per_task
        return range(start, start + self.classes_per_task)

    def seen_classes(self, task: int) -> int:
        """Number of classes seen after task ``task``."""
        return self.task_classes(task).stop

    def task_of_label(self) -> np.ndarray:
        """Task index of every label."""
        return np.concatenate([np.full(len(self.task_classes(t)), t) for t in range(self.num_tasks)])

    def set_task(self, task: int, memory_positions=None) -> None:
        """Serve task ``task``: its new classes plus ``memory_positions`` (into ``full_split('train')``)."""
        if not 0 <= task < self.num_tasks:
            raise TLError(f"task {task} does not exist; there are {self.num_tasks} tasks.")
        self.task = task
        self.memory_positions = np.zeros(0, dtype=np.int64) if memory_positions is None else \
            np.asarray(memory_positions, dtype=np.int64)

    def state_dict(self) -> dict:
        return {"task": self.task, "memory_positions": self.memory_positions.tolist()}

    def load_state_dict(self, state: dict) -> None:
        self.set_task(int(state["task"]), state["memory_positions"])

    # ----- transforms and loaders come from the wrapped DataModule (served features take none) -----------------
    def eval_transform(self):
        return None if self.feature_weights is not None else self.dataset.eval_transform()

    def train_transform(self):
        return None if self.feature_weights is not None else self.dataset.train_transform()

    @property
    def deterministic_train(self) -> bool:
        return self.dataset.deterministic_train

    def make_loader(self, dataset, shuffle: bool, batch_size: Optional[int] = None):
        return self.dataset.make_loader(dataset, shuffle, batch_size)

    def prepare_data(self) -> None:
        self.dataset.prepare_data()

    # ----- splits ---------------------------------------------------------------------------------------------
    def setup(self, stage: Optional[str] = None) -> None:
        if self.splits:
            return
        self.dataset.setup()
        mapping = np.full(len(self.dataset.classes), -1, dtype=np.int64)
        mapping[self.order] = np.arange(len(self.order))
        features = None
        if self.feature_weights is not None:
            from tl_lightning.data.backbone_features import BackboneFeatures

            if self.feature_weights == "none":
                raise TLError("serve_features with weights 'none' would extract features with a random backbone "
                              "the model does not share; give pretrained weights (bundled, hub or a checkpoint "
                              "path) or serve images.")
            features = BackboneFeatures(self.backbone, self.feature_weights, self.cache_dir)
            self.feature_weights_id = features.weights_id
        for split, ds in self.dataset.splits.items():
            if features is not None:
                ds = features.split(split, self.dataset.split_dataset(split, deterministic=True),
                                    self.dataset.make_loader, self.trainer)
            relabeled = SampleSet(RelabeledSource(ds.source, mapping), ds.indices, ds.transform)
            relabeled = relabeled.subset(np.flatnonzero(relabeled.targets >= 0))
            if split != "train" and self.eval_samples_per_class:
                relabeled = relabeled.subset(per_class_subset(relabeled.targets, self.eval_samples_per_class,
                                                              self.seed))
            self.splits[split] = relabeled

    def full_split(self, split: str, deterministic: bool = False) -> SampleSet:
        """Every sample of ``split`` (all tasks), labels in class order."""
        return super().split_dataset(split, deterministic)

    def task_split(self, split: str, task: int, deterministic: bool = False) -> SampleSet:
        """``train``: task ``task``'s new classes; ``val``/``test``: every class seen up to ``task``."""
        full = self.full_split(split, deterministic)
        classes = self.task_classes(task)
        low = classes.start if split == "train" and not self.joint else 0
        return full.subset(np.flatnonzero((full.targets >= low) & (full.targets < classes.stop)))

    def split_dataset(self, split: str, deterministic: bool = False) -> SampleSet:
        """The current task's view of ``split``; training adds the exemplar memory."""
        if split == "predict":
            split = "test"
        ds = self.task_split(split, self.task, deterministic)
        if split != "train" or self.joint or not len(self.memory_positions):
            return ds
        full = self.full_split(split, deterministic)
        replay = full.indices[self.memory_positions]
        return SampleSet(ds.source, np.concatenate([ds.indices, replay]), ds.transform)
