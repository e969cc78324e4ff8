"""Weights & Biases logging that works anywhere: online with an API key and a reachable server, else offline.

``WandbLogger`` is Lightning's logger with one change: ``offline`` defaults to *auto*. Without an API key
(``WANDB_API_KEY`` or a ``wandb login`` entry in ``~/.netrc``) or without a reachable server the run is written
offline into ``<run dir>/wandb/offline-run-*``, from where ``wandb sync`` uploads it later. ``WANDB_MODE``, when
set, always wins. Use it from any config with ``--config configs/logger/wandb.yaml``.

W&B cannot delete a logged row. So during training the rows are held back until the epoch that logged them has
ended and written ``last.ckpt`` (``callbacks/logger_resume.LoggerResume`` releases them): a run stopped mid-epoch
drops the rows of its unfinished epoch, and the resumed run, which redoes that epoch from ``last.ckpt``, logs each
step once. ``live=True`` sends every row at once instead; a resumed run then logs its redone steps twice.
"""
from __future__ import annotations

import netrc
import os
import socket
from typing import Any, Literal, Optional, Union
from urllib.parse import urlparse

from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

DEFAULT_BASE_URL = "https://api.wandb.ai"


def wandb_base_url() -> str:
    return os.environ.get("WANDB_BASE_URL") or DEFAULT_BASE_URL


def has_api_key(base_url: Optional[str] = None) -> bool:
    """True when an API key is configured: ``WANDB_API_KEY`` or the server's entry in ``~/.netrc``."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(base_url or wandb_base_url()).hostname or ""
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def server_reachable(base_url: Optional[str] = None, timeout: float = 3.0) -> bool:
    """True when a TCP connection to the W&B server opens within ``timeout`` seconds."""
    url = urlparse(base_url or wandb_base_url())
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except (OSError, TypeError):
        return False


def wandb_mode() -> tuple[str, str]:
    """``(mode, reason)``: ``WANDB_MODE`` if set, else ``online`` with a key and a server, else ``offline``."""
    forced = os.environ.get("WANDB_MODE")
    if forced:
        return forced, "WANDB_MODE is set"
    if not has_api_key():
        return "offline", "no W&B API key (set WANDB_API_KEY or run `wandb login`)"
    if not server_reachable():
        return "offline", f"the W&B server {wandb_base_url()} is unreachable"
    return "online", "API key and server found"


class WandbLogger(_LightningWandbLogger):
    """Lightning's ``WandbLogger``, offline automatically when there is no API key or no server.

    ``save_dir`` defaults to the run directory (``trainer.default_root_dir``, set by the CLI) and ``name`` to the
    run directory's name. ``log_model`` (upload checkpoints as artifacts) needs an online run and is switched
    off offline; the checkpoints stay in ``<run dir>/checkpoints``.
    """

    def __init__(
        self,
        project: str = "tl_lightning",
        entity: Optional[str] = None,
        tags: Optional[list[str]] = None,
        log_model: Union[Literal["all"], bool] = False,
        name: Optional[str] = None,
        save_dir: Optional[str] = None,
        group: Optional[str] = None,
        notes: Optional[str] = None,
        offline: Optional[bool] = None,
        resume: Optional[str] = "allow",
        live: bool = False,
        **kwargs: Any,
    ):
        """
        Args:
            project: W&B project.
            entity: W&B team or user (default: the API key's default entity).
            tags: run tags.
            log_model: upload checkpoints as artifacts: ``True`` (at the end), ``"all"`` (every save), ``False``.
            name: run name (default: the run directory's name).
            save_dir: where ``wandb/`` goes (default: the run directory).
            group: W&B run group (e.g. one per sweep or per experiment).
            notes: free-text notes on the run.
            offline: ``None`` decides automatically (key and server present -> online); True/False force it.
            resume: ``wandb.init``'s ``resume``; with ``"allow"`` a run given an existing ``id`` (a resumed fit
                gets the id stored in its checkpoint) continues that run instead of starting a new one.
            live: send each training row at once instead of when its epoch has ended (see the module docstring).
            **kwargs: more ``wandb.init`` arguments (``job_type``, ``config``, ...).
        """
        if offline is None:
            mode, reason = wandb_mode()
            offline = mode in ("offline", "dryrun")
            if offline and os.environ.get("WANDB_MODE") is None:
                rank_zero_info(f"W&B: logging offline ({reason}); upload later with `wandb sync <run dir>/wandb`.")
        if offline and log_model:
            rank_zero_info("W&B: log_model is off in offline mode; checkpoints stay in <run dir>/checkpoints.")
            log_model = False
        if save_dir is not None:
            os.makedirs(save_dir, exist_ok=True)
        super().__init__(project=project, entity=entity, tags=list(tags) if tags else None, log_model=log_model,
                         name=name, save_dir=save_dir if save_dir is not None else ".", offline=offline,
                         group=group, notes=notes, resume=resume, **kwargs)
        self.live = live
        self._holding = False
        self._held: list[tuple[dict, Optional[int]]] = []

    @rank_zero_only
    def log_metrics(self, metrics, step: Optional[int] = None) -> None:
        if self._holding:
            self._held.append((dict(metrics), step))
        else:
            super().log_metrics(metrics, step)

    def hold(self) -> None:
        """From now on keep rows back until ``release`` (unless ``live``)."""
        self._holding = not self.live

    def release(self, before_step: Optional[int] = None, keep_holding: bool = True) -> None:
        """Send the held rows logged before ``before_step`` (all with None); with ``keep_holding=False`` drop the
        others and send later rows at once."""
        held, self._held = self._held, []
        for metrics, step in held:
            if before_step is None or (step is not None and step < before_step):
                super().log_metrics(metrics, step)
            elif keep_holding:
                self._held.append((metrics, step))
        self._holding = keep_holding and not self.live


def _is_wandb_logger(class_path: Any) -> bool:
    if not isinstance(class_path, str):
        return False
    try:
        import importlib

        module, _, name = class_path.rpartition(".")
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return False
    return isinstance(cls, type) and issubclass(cls, _LightningWandbLogger)


def place_loggers_in_run_dir(trainer_config, run_name: Optional[str] = None) -> None:
    """Default every configured W&B logger's ``save_dir`` to ``trainer.default_root_dir`` and its ``name`` to
    ``run_name`` (default: the run directory's name), called by the CLI before the trainer is built."""
    run_dir = trainer_config.get("default_root_dir")
    loggers = trainer_config.get("logger")
    if not run_dir or loggers in (None, True, False):
        return
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        if not hasattr(logger, "get") or not _is_wandb_logger(logger.get("class_path")):
            continue
        init_args = logger.get("init_args")
        if init_args is None:
            continue
        if not init_args.get("save_dir"):
            init_args["save_dir"] = str(run_dir)
        if not init_args.get("name"):
            init_args["name"] = run_name or os.path.basename(os.path.normpath(str(run_dir)))
