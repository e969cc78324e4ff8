"""iCaRL's end of a task (Rebuffi et al. 2017, Alg. 2) and the state it leaves for the next task.

At the end of a task the memory is reduced to ``m`` exemplars per class (a prefix of each herding order), the
exemplars of the new classes are chosen by herding (Alg. 4, 5), the exemplar class means are recomputed, and
both classifiers (nearest-mean-of-exemplars and the network's outputs) are tested on every task seen. The
state (memory, means, accuracy rows, the previous model) goes into every checkpoint.

``TaskEnd`` is a mixin of ``ICaRL``: it reads the module's ``net``, ``memory``, ``dm``, ``flip_nme`` and
``freeze_backbone``.
"""
from __future__ import annotations

import copy
from typing import Optional

import numpy as np
import torch

from tl_lightning.errors import TLError
from tl_lightning.methods.exemplars import class_means, herding_order, nme_scores

STATE_KEY = "icarl"


class TaskEnd:
    """Memory update, class means and evaluation at a task's end; their state in checkpoints."""

    @torch.no_grad()
    def _task_end_on_rank_zero(self, task: int) -> dict:
        dm = self.dm
        seen = dm.seen_classes(task)
        was_training = self.training
        self.eval()
        try:
            self._update_memory(task)
            means = self._exemplar_means(seen)
            rows, seen_acc = self._evaluate(task, means)
        finally:
            self.train(was_training)
        return {"memory": self.memory.state_dict(), "means": None if means is None else means.cpu(),
                "rows": rows, "seen": seen_acc}

    def _update_memory(self, task: int) -> None:
        """Reduce the old classes' sets (prefix cut), then herd exemplars of the new classes (Alg. 4, 5)."""
        dm = self.dm
        sizes = self.memory.sizes(list(range(dm.seen_classes(task))))
        self.memory.reduce(sizes)
        train = dm.full_split("train", deterministic=True)
        targets = train.targets
        for c in dm.task_classes(task):
            positions = np.flatnonzero(targets == c)
            if sizes[c] == 0 or not len(positions):
                self.memory.add(c, positions[:0])
                continue
            feats, _ = self._embed_all("train", train.subset(positions))
            self.memory.add(c, positions[herding_order(feats, sizes[c]).numpy()])

    def _exemplar_means(self, seen: int) -> Optional[torch.Tensor]:
        """NME class means over each class's exemplars (None while a seen class has no exemplar)."""
        if any(len(self.memory.exemplars.get(c, ())) == 0 for c in range(seen)):
            return None
        exemplars = self.dm.full_split("train", deterministic=True).subset(self.memory.positions(list(range(seen))))
        feats, labels = self._embed_all("train", exemplars)
        flipped = self._embed_all("train", exemplars, flip=True)[0] if self.flip_nme else None
        return class_means(feats, labels, self.num_classes, flipped)

    def _evaluate(self, task: int, means: Optional[torch.Tensor]) -> tuple[dict, dict]:
        """Accuracy per task seen (a row of R) and on all seen classes, for NME and the network's outputs."""
        dm = self.dm
        seen = dm.seen_classes(task)
        test = dm.task_split("test", task, deterministic=True)
        feats, labels, logits = self._embed_all("test", test, with_logits=True)
        preds = {"cnn": logits[:, :seen].argmax(1)}
        if means is not None:
            preds["nme"] = nme_scores(feats, means[:seen]).argmax(1)
        task_of = torch.as_tensor(dm.task_of_label())[labels]
        rows, seen_acc = {}, {}
        for clf in ("nme", "cnn"):
            if clf not in preds:
                rows[clf], seen_acc[clf] = [None] * (task + 1), None
                continue
            correct = (preds[clf] == labels).float()
            rows[clf] = [float(correct[task_of == j].mean()) for j in range(task + 1)]
            seen_acc[clf] = float(correct.mean())
        return rows, seen_acc

    def _embed_all(self, split: str, dataset, flip: bool = False, with_logits: bool = False):
        """``φ(x)`` (and outputs) of every sample of ``dataset`` in eval mode, on this device."""
        loader = self.dm.make_loader(dataset, shuffle=False)
        feats, labels, logits = [], [], []
        for x, y in loader:
            x = x.to(self.device)
            if flip:
                x = torch.flip(x, dims=[3])
            f = self.net.embed(x)
            feats.append(f.float().cpu())
            labels.append(y)
            if with_logits:
                logits.append(self.net.head(f).float().cpu())
        feats, labels = torch.cat(feats), torch.cat(labels)
        return (feats, labels, torch.cat(logits)) if with_logits else (feats, labels)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[STATE_KEY] = {
            "finished": self.finished,
            "memory": self.memory.state_dict(),
            "means": None if self.means is None else self.means.cpu(),
            "rows": self.rows,
            "seen_acc": self.seen_acc,
            "classes_seen": self.classes_seen,
            "class_order": self.class_order,
            "previous_model": self._previous_state(),
            # the task whose optimizer state this is (the next task's start replaces it, on resume too)
            "optimizer_task": self._optimizer_task,
        }

    def _previous_state(self) -> Optional[dict]:
        if self.previous_model is None:
            return None
        state = self.previous_model.state_dict()
        if self.freeze_backbone:
            state = {k: v for k, v in state.items() if not k.startswith("backbone.")}
        return state

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get(STATE_KEY)
        if state is None:
            raise TLError("this checkpoint has no iCaRL state (memory, task index); resume from a checkpoint "
                          "written by ICaRL.")
        self.finished = int(state["finished"])
        self.memory.load_state_dict(state["memory"])
        self.means = state["means"]
        self.rows, self.seen_acc = state["rows"], state["seen_acc"]
        self.classes_seen = list(state["classes_seen"])
        self.class_order = list(state["class_order"])
        self._previous = []
        if state["previous_model"] is not None:
            previous = copy.deepcopy(self.net).eval()  # a frozen backbone is the same in both: not saved twice
            previous.load_state_dict(state["previous_model"], strict=not self.freeze_backbone)
            previous.requires_grad_(False)
            self._previous = [previous]
        self._optimizer_task = int(state["optimizer_task"])
        if self.means is not None:
            self.means = self.means.to(self.device)
