"""Per-batch work of a training step: backbone forwards and host-device synchronisations.

``StepProbe`` counts, for every training batch, how often the method's backbone (``pl_module.backbone``) runs
forward and which tensor-to-host conversions (``.item()``, ``float(t)``, ``.cpu()``, ``.tolist()``...) the
``training_step`` makes. On an accelerator each such conversion blocks the host until the device catches up;
on CPU they cost nothing, so ``torch.cuda.set_sync_debug_mode`` can't show them: the probe watches the calls
themselves with a ``TorchFunctionMode`` (no monkey-patching), which works on every device. It also counts the
``self.log`` calls of each step: each costs 1 to 2.5 ms on a CPU, and epoch values are handed over once per loop
run (``methods/epoch_logging.py``), so after an epoch's first batch a step makes none.
"""
from __future__ import annotations

import functools
from collections import Counter
from typing import Optional

import lightning as L
import torch
from torch.overrides import TorchFunctionMode

#: tensor methods that copy a value to the host (a device sync when the tensor lives on an accelerator)
SYNC_CALLS = frozenset({"item", "__float__", "__int__", "__bool__", "__index__", "tolist", "numpy", "cpu"})


class SyncCounter(TorchFunctionMode):
    """Counts host conversions of tensors made while active (``with SyncCounter() as c: ...; c.calls``)."""

    def __init__(self):
        super().__init__()
        self.calls: Counter = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in SYNC_CALLS or (name == "to" and _device_to_host(args, kwargs or {})):
            self.calls[name] += 1
        return func(*args, **(kwargs or {}))


def _device_to_host(args, kwargs) -> bool:
    """``t.to("cpu")`` of a tensor that is not on the host already."""
    source = args[0] if args else None
    target = kwargs.get("device", args[1] if len(args) > 1 else None)
    return (isinstance(source, torch.Tensor) and source.device.type != "cpu"
            and isinstance(target, (str, torch.device)) and torch.device(target).type == "cpu")


def stem(backbone: torch.nn.Module) -> torch.nn.Module:
    """The first convolution of the timm model inside ``backbone`` (every forward passes it once, also when a
    wrapper calls ``forward_features`` rather than the model itself), else ``backbone``."""
    timm_model = next((m for m in backbone.modules() if hasattr(m, "pretrained_cfg")), None)
    first_conv = (getattr(timm_model, "pretrained_cfg", None) or {}).get("first_conv")
    try:
        return timm_model.get_submodule(first_conv) if first_conv else backbone
    except AttributeError:
        return backbone


class StepProbe(L.Callback):
    """Records ``{"forwards": int, "syncs": Counter}`` per training batch in ``self.steps``: forwards of the stem
    of ``backbone`` (default: ``pl_module.backbone``) and host conversions inside ``training_step``."""

    def __init__(self, backbone: Optional[torch.nn.Module] = None):
        self.backbone = backbone
        self.steps: list[dict] = []
        self._forwards = 0
        self._syncs: Counter = Counter()
        self._logs = 0
        self._hook = None
        self._module = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        backbone = self.backbone if self.backbone is not None else pl_module.backbone
        self._hook = stem(backbone).register_forward_hook(self._count_forward)
        step = pl_module.training_step

        @functools.wraps(step)
        def probed_step(*args, **kwargs):
            with SyncCounter() as counter:
                out = step(*args, **kwargs)
            self._syncs.update(counter.calls)
            return out

        log = pl_module.log

        @functools.wraps(log)
        def counted_log(*args, **kwargs):
            self._logs += 1
            return log(*args, **kwargs)

        # instance attributes: the class's methods stay untouched
        pl_module.training_step, pl_module.log = probed_step, counted_log
        self._module = pl_module

    def _count_forward(self, module, inputs, output) -> None:
        self._forwards += 1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self._forwards, self._syncs, self._logs = 0, Counter(), 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self.steps.append({"forwards": self._forwards, "syncs": Counter(self._syncs), "logs": self._logs})

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self._module is not None:
            del self._module.training_step, self._module.log
            self._module = None
