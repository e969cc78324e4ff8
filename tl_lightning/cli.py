"""Command line: ``python -m tl_lightning {fit,validate,test,predict,submit,sweep} ...`` (LightningCLI).

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
from typing import Optional

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from tl_lightning.callbacks.results import BestCheckpoint, ResultsWriter
from tl_lightning.data.base import TLDataModule
from tl_lightning.errors import TLError
from tl_lightning.methods.base import TransferModule

#: subcommands that are not Trainer entry points: name -> "module:function(argv)"
EXTRA_COMMANDS = {
    "submit": "tl_lightning.slurm:main",
    "sweep": "tl_lightning.sweep:main",
}

CONFIG_FILE = "config.yaml"


class SaveRunConfig(SaveConfigCallback):
    """Saves the resolved config as ``<run dir>/config.yaml``, overwriting the previous run's copy."""

    def __init__(self, *args, **kwargs):
        kwargs["overwrite"] = True
        kwargs["save_to_log_dir"] = False
        super().__init__(*args, **kwargs)

    def save_config(self, trainer, pl_module, stage: str) -> None:
        run_dir = trainer.default_root_dir
        os.makedirs(run_dir, exist_ok=True)
        self.parser.save(self.config, os.path.join(run_dir, CONFIG_FILE), skip_none=False, overwrite=True,
                         multifile=False)


class TLCLI(LightningCLI):
    """LightningCLI with task-fact links, a run directory, test-after-fit and run results."""

    def __init__(self, *args, **kwargs):
        self._started = time.perf_counter()
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--test_after_fit", type=bool, default=True,
                            help="After fit, evaluate the best checkpoint on the test split.")
        parser.link_arguments("model.init_args.backbone", "data.init_args.backbone")
        for fact in ("num_classes", "multilabel", "class_names"):
            parser.link_arguments(f"data.{fact}", f"model.init_args.{fact}", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if not config.trainer.get("default_root_dir"):
            name = "run"
            configs = config.get("config") or []
            if configs:
                name = os.path.splitext(os.path.basename(str(configs[-1])))[0]
            config.trainer.default_root_dir = os.path.join("runs", name)

    # ----- results -----------------------------------------------------------------------------------------
    def _results_writer(self) -> Optional[ResultsWriter]:
        return next((c for c in self.trainer.callbacks if isinstance(c, ResultsWriter)), None)

    def _finish(self, command: str, metrics: dict) -> None:
        writer = self._results_writer()
        if writer is None:
            return
        model = self.model
        extra = {"class_names": list(getattr(model, "class_names", []) or [])}
        extra.update(model.results() if hasattr(model, "results") else {})
        config_path = os.path.join(self.trainer.default_root_dir, CONFIG_FILE)
        writer.write(self.trainer, command, metrics, config_path if os.path.exists(config_path) else None,
                     time.perf_counter() - self._started, extra)

    def after_fit(self) -> None:
        metrics = dict(self.trainer.callback_metrics)
        if self.config[self.subcommand].get("test_after_fit", True) and not self.trainer.interrupted:
            ckpt = self.trainer.checkpoint_callback
            ckpt_path = "best" if ckpt is not None and getattr(ckpt, "best_model_path", "") else None
            results = self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=ckpt_path)
            for r in results:
                metrics.update(r)
        self._finish("fit", metrics)

    def after_validate(self) -> None:
        self._finish("validate", dict(self.trainer.callback_metrics))

    def after_test(self) -> None:
        self._finish("test", dict(self.trainer.callback_metrics))


def run_cli(args: Optional[list[str]] = None, run: bool = True) -> TLCLI:
    return TLCLI(
        TransferModule,
        TLDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=SaveRunConfig,
        trainer_defaults={"callbacks": [ResultsWriter(), BestCheckpoint()]},
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
    try:
        if argv and argv[0] in EXTRA_COMMANDS:
            module, func = EXTRA_COMMANDS[argv[0]].split(":")
            getattr(importlib.import_module(module), func)(argv[1:])
            return
        run_cli(argv)
    except TLError as e:
        print(f"error: {_user_message(e)}", file=sys.stderr)
        raise SystemExit(2) from None
    except Exception as e:  # a TLError wrapped by a DataLoader worker or a hook
        if e.__class__.__name__ == "TLError" or "TLError" in str(e)[:200]:
            print(f"error: {_user_message(e)}", file=sys.stderr)
            raise SystemExit(2) from None
        raise
