"""Command line: ``python -m tl_lightning {fit,validate,test,predict,submit,sweep,retrieve,compare} ...`` (LightningCLI).

Model and data are picked by ``class_path``/``init_args``; the task facts only the DataModule knows (class
count, multi-label, class names) are linked into the model, and the model's backbone is linked into the data
(its input size and normalisation). After ``fit`` the best checkpoint is tested (``--test_after_fit``), a
results table is printed and ``metrics.json`` lands in the run directory (``trainer.default_root_dir``).
"""
from __future__ import annotations

import importlib
import os
import sys
import time
import warnings
from typing import Literal, Optional

import lightning as L
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from tl_lightning.callbacks.compile_advice import CompileAdvice
from tl_lightning.callbacks.interrupt import InterruptCheckpoint, take_stop_signal
from tl_lightning.callbacks.logger_resume import LoggerResume, resume_loggers
from tl_lightning.callbacks.media import ConfusionMatrix, log_run_media
from tl_lightning.callbacks.predictions import PredictionWriter
from tl_lightning.callbacks.random_state import RandomState
from tl_lightning.callbacks.requeue import Requeued, SLURMRequeue
from tl_lightning.callbacks.results import BestCheckpoint, ResultsWriter, run_checkpoint
from tl_lightning.callbacks.task_schedule import sequence_epochs
from tl_lightning.backbones import check_backbone_name
from tl_lightning.console import CompactModelSummary, quiet_expected_noise
from tl_lightning.errors import TLError
from tl_lightning.loggers import place_loggers_in_run_dir
from tl_lightning.methods.base import TransferModule
from tl_lightning.parser_errors import explain as explain_parser_error
from tl_lightning import atomic, checkpoint_args, link_targets, run_folders

#: subcommands that are not Trainer entry points: name -> "module:function(argv)"
EXTRA_COMMANDS = {
    "submit": "tl_lightning.slurm:main",
    "sweep": "tl_lightning.sweep:main",
    "retrieve": "tl_lightning.retrieval:main",
    "compare": "tl_lightning.compare:main",
}

CONFIG_FILE = "config.yaml"


def served_features_request(model) -> Optional[dict]:
    """The DataModule's ``serve_features``, from the model's arguments: what a model that reads a frozen
    backbone's features declares (``served_features``); None (images) for every other method."""
    if model is None or not model.get("class_path"):
        return None
    declare = getattr(checkpoint_args.resolve_class(model.class_path), "served_features", None)
    init_args = model.get("init_args")
    return declare(**(vars(init_args) if init_args is not None else {})) if declare else None

class SaveRunConfig(SaveConfigCallback):
    """Saves the resolved config as ``<run dir>/config.yaml``, overwriting the previous run's copy."""

    def __init__(self, *args, **kwargs):
        kwargs["overwrite"] = True
        kwargs["save_to_log_dir"] = False
        super().__init__(*args, **kwargs)

    def save_config(self, trainer, pl_module, stage: str) -> None:
        run_dir = trainer.default_root_dir
        atomic.write_text(os.path.join(run_dir, CONFIG_FILE), self.parser.dump(self.config, skip_none=False))


class TLArgumentParser(LightningArgumentParser):
    """Parser whose errors are one line (``error: ...``) plus a pointer to ``--help``, not a usage wall."""

    #: the command line being parsed (names the file of a YAML error)
    argv: list[str] = []

    def error(self, message: str, ex: Optional[Exception] = None):
        if not self.exit_on_error:  # a nested parser: let the outer one report
            return super().error(message, ex)
        last = TLError.last
        if last is not None and str(last) in str(message):
            text = _user_message(last)
        else:
            text = explain_parser_error(str(message), TLArgumentParser.argv)
        print(f"error: {text}", file=sys.stderr)
        raise SystemExit(2)


class TLCLI(LightningCLI):
    """LightningCLI with task-fact links, a run directory, test-after-fit and run results."""

    def __init__(self, *args, **kwargs):
        self._started = time.perf_counter()
        self._started_wall = time.time()  # PNGs written after this are logged as media
        argv = kwargs.get("args")
        self._argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
        TLArgumentParser.argv = self._argv
        super().__init__(*args, **kwargs)

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        link_targets.refuse_given(self._argv)  # the links below would silently write over such a value
        super().parse_arguments(parser, args)
        command = self.config.get("subcommand")
        config = self.config[command] if command else self.config
        self._root_typed = run_folders.root_dir_typed(self._argv)
        self._root = config.trainer.get("default_root_dir")
        if not self._root:
            configs = config.get("config") or []
            name = os.path.splitext(os.path.basename(str(configs[-1])))[0] if configs else "run"
            self._root = os.path.join("runs", name)
        if command and config.get("ckpt_path") == "last":
            config.ckpt_path = run_folders.resolve_last(self._root, self._root_typed)
        self._typed_model_values = {}
        if command and config.get("ckpt_path"):  # checked before LightningCLI merges the checkpoint's hparams
            hparams = checkpoint_args.read_hyperparameters(str(config.ckpt_path))
            model = config.get("model")
            checkpoint_args.check_method_class(str(config.ckpt_path), hparams, model.get("class_path") if model else None)
            self._typed_model_values = checkpoint_args.typed_values(model, self._argv) if model else {}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--test_after_fit", type=bool, default=True,
                            help="After fit, evaluate the best checkpoint on the test split.")
        parser.add_argument("--test_checkpoint", type=Literal["best", "last"], default="best",
                            help="Which checkpoint test_after_fit evaluates: best (by the method's validation "
                                 "metric) or last (the final weights, e.g. at the end of an annealed schedule).")
        parser.link_arguments("model.init_args.backbone", "data.init_args.backbone")
        parser.link_arguments("model", "data.init_args.serve_features", compute_fn=served_features_request)
        for fact in ("num_classes", "multilabel", "class_names"):
            parser.link_arguments(f"data.{fact}", f"model.init_args.{fact}", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if self._typed_model_values:
            notes = checkpoint_args.reconcile_typed_flags(self.subcommand, str(config.ckpt_path), config.model,
                                                         self._typed_model_values)
            for note in notes:
                print(f"note: {note}", file=sys.stderr)
        backbone = (config.get("model") or {}).get("init_args", {}).get("backbone")
        if backbone:
            check_backbone_name(backbone)
        run_dir = run_folders.choose_run_dir(self._root, self._root_typed, self.subcommand or "fit",
                                             config.get("ckpt_path"))
        config.trainer.default_root_dir = run_dir
        run_folders.hand_over(self._root, run_dir)
        place_loggers_in_run_dir(config.trainer, run_folders.run_name(self._root, run_dir))
        if self.subcommand == "fit":  # a resumed fit logs into the same W&B run and TensorBoard/CSV version
            resume_loggers(config.trainer, config.get("ckpt_path"))

    def instantiate_trainer(self, **kwargs):
        trainer_config = self._get(self.config_init, "trainer", default={})
        strategy = trainer_config.get("strategy")
        if strategy == "ddp" and not getattr(self.model, "automatic_optimization", True):
            # manual optimisation steps parts of the model on their own (e.g. a domain classifier on detached
            # features), so a backward pass may leave parameters without gradients: DDP must expect that
            kwargs.setdefault("strategy", "ddp_find_unused_parameters_true")
        defaults = self.trainer_defaults.get("callbacks", [])
        summary = next((c for c in defaults if isinstance(c, CompactModelSummary)), None)
        if summary is not None:  # ours in place of Lightning's, on unless the config turns summaries off
            summary.enabled = trainer_config.get("enable_model_summary") is not False
            kwargs["enable_model_summary"] = False
        planned = sequence_epochs(self.model, self.datamodule)  # ICaRL's tasks x epochs_per_task
        if planned and trainer_config.get("max_epochs") is None and trainer_config.get("max_steps") in (None, -1):
            kwargs.setdefault("max_epochs", planned)
        if not trainer_config.get("plugins"):
            kwargs.setdefault("plugins", [atomic.AtomicCheckpointIO()])  # checkpoints written atomically
        return super().instantiate_trainer(**kwargs)

    # ----- results -----------------------------------------------------------------------------------------
    def _results_writer(self) -> Optional[ResultsWriter]:
        return next((c for c in self.trainer.callbacks if isinstance(c, ResultsWriter)), None)

    def _finish(self, command: str, metrics: dict) -> None:
        writer = self._results_writer()
        if writer is None:
            return
        model = self.model
        extra = {"class_names": list(getattr(model, "class_names", []) or []), **getattr(self, "_tested", {})}
        extra.update(model.results() if hasattr(model, "results") else {})
        report = getattr(self.datamodule, "data_report", None)
        if report is not None:
            extra["data_report"] = report.as_dict()
        config_path = os.path.join(self.trainer.default_root_dir, CONFIG_FILE)
        writer.write(self.trainer, command, metrics, config_path if os.path.exists(config_path) else None,
                     time.perf_counter() - self._started, extra)
        log_run_media(self.trainer, since=self._started_wall)

    def after_fit(self) -> None:
        metrics = dict(self.trainer.callback_metrics)
        if self.config[self.subcommand].get("test_after_fit", True) and not self.trainer.interrupted:
            ckpt = run_checkpoint(self.trainer)  # not trainer.checkpoint_callback: the first of any
            which = self.config[self.subcommand].get("test_checkpoint", "best")
            path = (ckpt.best_model_path if which == "best" else ckpt.last_model_path) if ckpt is not None else ""
            # no file (a fitted head never steps, so no best checkpoint; no checkpoint callback): the final weights
            results = self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=path or None)
            for r in results:
                metrics.update(r)
            self._tested = {"tested_checkpoint": path or None, "test_checkpoint": which}
        self._finish("fit", metrics)

    def after_validate(self) -> None:
        self._finish("validate", dict(self.trainer.callback_metrics))

    def after_test(self) -> None:
        self._finish("test", dict(self.trainer.callback_metrics))


class ArgumentCheck(TLCLI):
    """Parses a command line and stops: no run folder, no model, no data (``submit`` checks ``fit``'s arguments)."""

    def before_instantiate_classes(self) -> None:
        pass

    def instantiate_classes(self) -> None:
        pass


def check_arguments(args: list[str]) -> None:
    """Parse ``fit`` arguments (``--config ... --model.lr=...``, no subcommand) as the CLI would; a bad one is one
    ``error:`` line and exit 2. ``--ckpt_path`` is left out (it belongs to the subcommand, checked when it runs)."""
    kept, skip = [], False
    for arg in args:
        if skip or arg == "--ckpt_path":
            skip = not skip
            continue
        if not arg.startswith("--ckpt_path="):
            kept.append(arg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "args and command line arguments both given": intended here
        run_cli(kept, run=False, cli_class=ArgumentCheck)


def run_cli(args: Optional[list[str]] = None, run: bool = True, cli_class: type = TLCLI) -> TLCLI:
    argv = [str(a) for a in (sys.argv[1:] if args is None else args)]
    return cli_class(
        TransferModule,
        L.LightningDataModule,  # TLDataModule or a wrapper of them (e.g. the domain-adaptation pair)
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=SaveRunConfig,
        parser_class=TLArgumentParser,
        trainer_defaults={"callbacks": [ResultsWriter(), BestCheckpoint(), SLURMRequeue(), PredictionWriter(),
                                        ConfusionMatrix(), LoggerResume(), InterruptCheckpoint(argv), RandomState(),
                                        CompileAdvice(), CompactModelSummary()]},
        auto_configure_optimizers=False,
        parser_kwargs={"parser_mode": "omegaconf"},
        args=args,
        run=run,
    )


def _user_message(err: BaseException) -> str:
    msg = str(err).strip()
    if "Original Traceback" in msg:  # re-raised from a DataLoader worker: keep the final line
        msg = msg.strip().splitlines()[-1].split(": ", 1)[-1]
    return msg


def main(argv: Optional[list[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    quiet_expected_noise()
    try:
        if argv and argv[0] in EXTRA_COMMANDS:
            module, func = EXTRA_COMMANDS[argv[0]].split(":")
            getattr(importlib.import_module(module), func)(argv[1:])
            return
        take_stop_signal()
        try:
            run_cli(None if argv == sys.argv[1:] else argv)
        except Requeued:
            run_folders.forget_created()  # SLURM runs this job again, in the same run folder
            return
        except BaseException:
            run_folders.discard_unused_run_folders()  # a command that failed early leaves no run folder behind
            stopped_by = take_stop_signal()
            if stopped_by is not None:  # killed: never exit 0 (143 = SIGTERM, 130 = SIGINT)
                raise SystemExit(128 + stopped_by) from None
            raise
        run_folders.forget_created()
    except TLError as e:
        print(f"error: {_user_message(e)}", file=sys.stderr)
        raise SystemExit(2) from None
    except Exception as e:  # a TLError wrapped by jsonargparse, a DataLoader worker or a hook
        wrapped = _wrapped_user_error(e)
        if wrapped is None:
            raise
        print(f"error: {wrapped}", file=sys.stderr)
        raise SystemExit(2) from None


def _wrapped_user_error(err: BaseException) -> Optional[str]:
    seen = err
    while seen is not None:  # explicit chain
        if isinstance(seen, TLError):
            return _user_message(seen)
        seen = seen.__cause__ or seen.__context__
    last = TLError.last
    if last is not None and str(last) and str(last) in str(err):
        return _user_message(last)
    if "TLError" in str(err):  # re-raised from a worker process under another type
        return _user_message(err)
    return None
