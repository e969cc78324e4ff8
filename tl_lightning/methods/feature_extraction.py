"""Feature extraction: a frozen pretrained backbone and a shallow head.

Off-the-shelf features read the penultimate layer (Razavian et al., "CNN Features off-the-shelf", 2014).
The full-network embedding (Garcia-Gasulla et al., 2018) reads the spatial mean of every convolutional layer
(``layers: every_conv``, the paper's choice and FNE's default), standardises each feature with training-set
statistics and discretises it to {-1, 0, 1} at thresholds -0.25 and 0.15. With deterministic inputs the
DataModule serves the features, extracted once per image across epochs and runs (``feature_inputs``).

Heads (``head``): ``linear`` trains by SGD over epochs; ``svm`` (CNN-SVM, Razavian et al. 2014) and ``logistic``
(L-BFGS, L2 strength picked on val, Kornblith et al. 2019) are fitted in full batch on the cached features at fit
start (``shallow_heads``), then one epoch only measures them. ``recipe`` names a read-out + normalisation + head,
or ``auto`` picks the best on val (``recipes``). ``tta_views > 1`` averages deterministic crops and flips
(Razavian's "aug"), each view cached on its own (``tl_lightning.tta``).
"""
from __future__ import annotations

from typing import Literal, Optional, Union

import torch

from tl_lightning.backbones import DEFAULT_BACKBONE, FeatureExtractor, frozen_backbone, readout_key
from tl_lightning.errors import TLError
from tl_lightning.methods.base import TransferModule, make_head
from tl_lightning.methods.feature_inputs import FeatureInputs
from tl_lightning.methods.lean_checkpoint import drop_backbone, refill_backbone
from tl_lightning.methods.recipes import (AUTO, CANDIDATES, FNE_LAYERS, FNE_THRESHOLDS, RECIPES, Recipe, embed,
                                          parse_recipe, select_recipe, sweep_head)
from tl_lightning.methods.shallow_heads import DEFAULT_C_GRID, DEFAULT_REG_GRID, fit_svm, refit
from tl_lightning.tta import batch_views

HEADS = ("linear", "svm", "logistic")
__all__ = ["FNE_THRESHOLDS", "FeatureExtraction", "HEADS"]


class FeatureExtraction(FeatureInputs, TransferModule):
    """Frozen backbone (always in eval mode, BatchNorm statistics fixed) plus a linear/MLP, SVM or logistic head."""

    def __init__(
        self,
        backbone: str = DEFAULT_BACKBONE,
        weights: str = "bundled",
        recipe: Optional[str] = None,
        layers: Union[str, list[str]] = "penultimate",
        embedding: Literal["pooled", "fne"] = "pooled",
        l2_normalize: bool = False,
        hidden_dim: int = 0,
        dropout: float = 0.0,
        cache: bool = True,
        cache_dir: Optional[str] = None,
        head: Literal["linear", "svm", "logistic"] = "linear",
        svm_c: float = 1.0,
        svm_c_grid: Optional[list[float]] = None,
        reg_grid: Optional[list[float]] = None,
        lbfgs_max_iter: int = 500,
        tta_views: int = 1,
        tta_crop: float = 0.875,
        **kwargs,
    ):
        """
        Args:
            backbone: any timm model name.
            weights: ``bundled``, ``hub``, ``none`` or a checkpoint path.
            recipe: ``auto`` (choose read-out, L2 and full-batch head on val, see ``recipes``), a recipe name
                such as ``penultimate+logistic`` or ``fne+l2+svm`` (sets ``layers``, ``embedding``,
                ``l2_normalize`` and ``head``, the SVM's C swept on val), or null: the arguments below apply.
            layers: ``penultimate``, ``all`` (timm's feature_info levels + penultimate), ``every_block``
                (every block + penultimate), ``every_conv`` (every conv layer) or a list of module names.
            embedding: ``pooled`` (features as read) or ``fne`` (full-network embedding; with
                ``layers: penultimate`` it reads ``every_conv``, Garcia-Gasulla et al.'s choice).
            l2_normalize: L2-normalise the embedding before the head.
            hidden_dim: 0 for a linear head, else the hidden width of a one-layer MLP head.
            dropout: dropout before the head's output layer.
            cache: keep extracted features on disk and reuse them (deterministic inputs only); with
                ``cache_dir`` (default ``$TL_LIGHTNING_CACHE`` or ``~/.cache/tl_lightning``), ``weights``, the
                read-outs and the views, it goes to the DataModule, which serves the features
                (``served_features``).
            head: ``linear`` (SGD over epochs; an MLP with ``hidden_dim``), ``svm`` (one-vs-rest squared-hinge
                linear SVM, Razavian et al. 2014) or ``logistic`` (L-BFGS, L2 strength chosen on val from
                ``reg_grid``, refitted on train+val, Kornblith et al. 2019). ``svm``/``logistic`` are fitted in
                full batch on cached features when fit starts; training then runs one epoch (``max_epochs``
                is ignored) and needs ``data.augment=false``.
            svm_c: the SVM's C (LIBLINEAR / scikit-learn ``LinearSVC`` convention), fitted on train.
            svm_c_grid: C values to sweep on val instead (then refitted on train+val); recipes default to 15
                values log-spaced over [1e-5, 1e2].
            reg_grid: L2 strengths of the logistic head's sweep (on the mean loss; scikit-learn's
                ``C = 1 / (reg * N)``); default 17 values log-spaced over [1e-6, 1e2].
            lbfgs_max_iter: L-BFGS iterations per fit of the ``svm``/``logistic`` head.
            tta_views: number of deterministic views (full image, flip, five crops, flipped crops) whose
                features are averaged for every split and in ``predict``, each view cached separately.
            tta_crop: share of the image side the TTA crops keep.
        """
        super().__init__(**kwargs)
        pinned = parse_recipe(recipe)
        start = pinned or (CANDIDATES[0] if recipe == AUTO else None)  # auto starts as its first candidate
        if start is not None:
            layers, embedding, l2_normalize, head = start.layers, start.embedding, start.l2, start.head
            svm_c_grid = svm_c_grid or list(DEFAULT_C_GRID)
        if head not in HEADS:
            raise TLError(f"unknown head '{head}'; choose one of {', '.join(HEADS)} (--model.head).")
        if head != "linear" and hidden_dim:
            raise TLError(f"the {head} head is linear; set --model.hidden_dim=0 or use --model.head=linear.")
        if tta_views < 1:
            raise TLError(f"tta_views must be at least 1 (got {tta_views}); fix --model.tta_views.")
        self.recipe = recipe
        self.head_type = head
        self.svm_c = svm_c
        self.svm_c_grid = list(svm_c_grid) if svm_c_grid else None
        self.reg_grid = list(reg_grid) if reg_grid else list(DEFAULT_REG_GRID)
        self.lbfgs_max_iter = lbfgs_max_iter
        self.tta_views = tta_views
        self.tta_crop = tta_crop
        self.head_fit: dict = {}  # how the svm/logistic head was fitted (into metrics.json)
        self.recipe_selection: dict = {}  # recipe=auto: every candidate's val score and the choice
        self._preselected = None  # the chosen candidate's sweep (its train fit seeds the refit)
        # (weight, bias) of the chosen head fitted on train only: a head refitted on train+val has seen the
        # validation images, so val/* is measured with this one (the held-out score the choice was made on)
        self.heldout_head: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        # the shallow heads are fitted in closed loop, not by Lightning's optimizer
        self.automatic_optimization = head == "linear"
        self.backbone_name, self.weights = backbone, weights
        if embedding == "fne" and layers == "penultimate":
            layers = FNE_LAYERS
        self.embedding = embedding
        self.l2_normalize = l2_normalize
        self.extractor = FeatureExtractor(frozen_backbone(backbone, weights), layers)
        self.readout = readout_key(layers)  # the name of the read-out in served batches
        self._build_head(hidden_dim, dropout if head == "linear" else 0.0)

    def _build_head(self, hidden_dim: int = 0, dropout: float = 0.0) -> None:
        """The head and the FNE statistics, sized by the current read-out."""
        model = self.extractor.model
        self.extractor.eval()  # the probe below must not move BatchNorm statistics
        with torch.no_grad():
            channels = model.pretrained_cfg.get("input_size", (3,))[0]
            device = next(model.parameters()).device
            self.feature_dim = self.extractor(torch.zeros(2, channels, 32, 32, device=device)).shape[1]
        self.head = make_head(self.feature_dim, self.num_classes, hidden_dim, dropout).to(device)
        self.register_buffer("fne_mean", torch.zeros(self.feature_dim, device=device))
        self.register_buffer("fne_std", torch.ones(self.feature_dim, device=device))

    @property
    def recipe_name(self) -> Optional[str]:
        """The recipe in use: the pinned one, or auto's choice once made."""
        return self.recipe_selection.get("chosen") or (self.recipe if self.recipe != AUTO else None)

    def apply_recipe(self, recipe: Recipe) -> None:
        """Switch to ``recipe``'s read-out, normalisation and head (a new, unfitted head of the right size)."""
        old = self.extractor
        new = self.readout_extractor(recipe.layers)
        if new is not old:
            old.remove_hooks()
            self.extractor = new
        self.readout = readout_key(recipe.layers)
        self.embedding, self.l2_normalize, self.head_type = recipe.embedding, recipe.l2, recipe.head
        self._build_head()

    # ----- the frozen backbone ------------------------------------------------------------------------------
    backbone = property(lambda self: self.extractor, doc="The model contract's name for the ``extractor``.")

    def train(self, mode: bool = True):
        super().train(mode)
        self.extractor.eval()  # BatchNorm statistics of the backbone never move
        return self

    def embed(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw backbone features -> the embedding the head sees."""
        stats = (self.fne_mean, self.fne_std) if self.embedding == "fne" else None
        return embed(raw, stats, self.l2_normalize)

    def features(self, x) -> torch.Tensor:
        """The embedding of a batch: served features (``{read-out: [B, D]}``) or images through the backbone."""
        return self.embed(self.raw_features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> dict:
        """As ``TransferModule``, on the features averaged over the same ``tta_views`` as every split."""
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        if isinstance(x, dict) or x.ndim != 4:
            return super().predict_step(batch, batch_idx, dataloader_idx)
        dm = self.trainer.datamodule if self._trainer is not None else None
        views = batch_views(self.tta_views, flips=getattr(dm, "hflip", 0) > 0, crop=self.tta_crop)
        with torch.no_grad():
            raw = torch.stack([self.extractor(x if v is None else v(x)) for v in views]).mean(0)
        logits = self.head(self.embed(raw))
        probs = logits.sigmoid() if self.multilabel else logits.softmax(-1)
        score, pred = probs.max(-1)
        return {"pred": pred, "score": score, "probs": probs}

    # ----- the full-batch heads (svm, logistic) and recipe selection -------------------------------------------
    @property
    def fitted_head(self) -> bool:
        return self.head_type != "linear"

    def on_fit_start(self) -> None:
        dm = self.trainer.datamodule
        need = "recipe: auto" if self.recipe == AUTO else f"the {self.head_type} head" if self.fitted_head else \
            "the full-network embedding" if self.embedding == "fne" else None
        self.served(dm, required=need)
        if self.recipe == AUTO and not self.recipe_selection:  # a resumed fit keeps the checkpoint's choice
            self._check_fixed_inputs(dm)
            recipe, self.recipe_selection, self._preselected = select_recipe(
                self, dm.feature_matrices("train"), dm.feature_matrices("val"))
            self.apply_recipe(recipe)
        if self.embedding == "fne":
            self.fit_fne_statistics(dm.feature_matrices("train"))
        if self.fitted_head:
            self.fit_head(dm)

    def on_validation_start(self) -> None:
        self.served(self.trainer.datamodule)  # (after a checkpoint is restored: its weights are checked)

    on_test_start = on_validation_start

    def _check_fixed_inputs(self, dm) -> None:
        if not dm.deterministic_train:
            raise TLError(f"the {self.recipe_name or self.head_type} head is fitted once on fixed features, so "
                          "training augmentation cannot apply; set --data.augment=false (use --model.tta_views "
                          "for crops and flips).")

    def fit_head(self, dm) -> dict:
        """Fit the ``svm``/``logistic`` head in full batch on the served train (and val) embeddings (FNE
        statistics fitted)."""
        self._check_fixed_inputs(dm)
        x_train, y_train = self.embedded(dm.feature_matrices("train"))
        task = dict(num_classes=self.num_classes, multilabel=self.multilabel)
        if self.head_type == "svm" and not self.svm_c_grid:
            fit = fit_svm(x_train, y_train, C=self.svm_c, max_iter=self.lbfgs_max_iter, **task)
            info = {"head": "svm", "C": self.svm_c}
        else:
            x_val, y_val = self.embedded(dm.feature_matrices("val"))
            sweep, self._preselected = self._preselected, None
            if sweep is None:
                sweep = sweep_head(self.head_type, x_train, y_train, x_val, y_val, reg_grid=self.reg_grid,
                                   c_grid=self.svm_c_grid, max_iter=self.lbfgs_max_iter, **task)
            fit = refit(sweep, torch.cat([x_train, x_val]), torch.cat([y_train, y_val]),
                        max_iter=self.lbfgs_max_iter, **task)
            self.heldout_head = (sweep.best_fit.weight.float(), sweep.best_fit.bias.float())
            info = {"head": self.head_type, **sweep.as_dict(), "refit_on": "train+val"}
        with torch.no_grad():
            self.head.weight.copy_(fit.weight.to(self.head.weight))
            self.head.bias.copy_(fit.bias.to(self.head.bias))
        info.update(lbfgs_iterations=fit.iterations, objective=fit.objective, fit_seconds=round(fit.seconds, 3),
                    tta_views=self.tta_views)
        self.head_fit = info
        return info

    def on_train_epoch_end(self) -> None:
        if self.fitted_head:
            self.trainer.should_stop = True  # the head is already fitted: one measuring epoch is enough

    def results(self) -> dict:
        out = {"head_fit": self.head_fit} if self.head_fit else {}
        if self.recipe_selection:
            out["recipe_selection"] = self.recipe_selection
        if self.recipe_name:
            out["summary"] = {"recipe": self.recipe_name + (" (auto)" if self.recipe == AUTO else "")}
        return out

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["head_fit"] = self.head_fit
        checkpoint["recipe_selection"] = self.recipe_selection
        if self.heldout_head is not None:
            checkpoint["heldout_head"] = {"weight": self.heldout_head[0], "bias": self.heldout_head[1]}
        drop_backbone(checkpoint, self, self.extractor.model, self.backbone_name, self.weights,
                      self.backbone_weights_id)  # the frozen backbone by identity (``lean_checkpoint``)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # runs before the state dict is loaded: an auto run's head must first take the chosen recipe's shape
        self.head_fit = checkpoint.get("head_fit", {}) or {}
        selection = checkpoint.get("recipe_selection") or {}
        if selection.get("chosen") and selection["chosen"] != self.recipe_selection.get("chosen"):
            self.apply_recipe(RECIPES[selection["chosen"]])
        self.recipe_selection = selection or self.recipe_selection
        heldout = checkpoint.get("heldout_head")
        self.heldout_head = (heldout["weight"], heldout["bias"]) if heldout else None
        refill_backbone(checkpoint, self, self.extractor.model, self.backbone_weights_id)

    # ----- steps --------------------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx: int) -> Optional[torch.Tensor]:
        x, y = batch
        if self.fitted_head:  # measure the fitted head on the training split; nothing to optimise
            with torch.no_grad():
                self.log_metrics("train", self(x), y)
            return None
        return self.supervised_step("train", batch)

    def validation_step(self, batch, batch_idx: int) -> None:
        self.supervised_step("val", batch, forward=self._heldout_forward if self.heldout_head else None)

    def _heldout_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The chosen head as fitted on train only (see ``heldout_head``)."""
        weight, bias = (t.to(self.head.weight) for t in self.heldout_head)
        return self.features(x) @ weight.T + bias

    def test_step(self, batch, batch_idx: int) -> None:
        self.supervised_step("test", batch)

    def param_groups(self) -> list[dict]:
        return [{"params": list(self.head.parameters()), "lr": self.lr, "name": "head"}]
