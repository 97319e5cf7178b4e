"""The study's four optimizers, built over the adapter's trainable parameters.

Every optimizer gets the trial's learning rate unchanged (the study compared them at lr=2e-4) and these settings:

| name                | implementation                          | betas        | weight decay | notes                          |
|---------------------|-----------------------------------------|--------------|--------------|--------------------------------|
| adamw               | torch.optim.AdamW                       | (0.9, 0.999) | config       | eps 1e-8                       |
| adafactor           | transformers Adafactor                  | beta1 None   | config       | fixed lr, no relative step     |
| schedule_free_adamw | schedulefree.AdamWScheduleFree          | (0.9, 0.999) | config       | constant lr; eval mode to measure |
| lion                | lion_pytorch.Lion                       | (0.9, 0.99)  | config       | sign update                    |

Schedule-free AdamW keeps two parameter sequences and evaluates at their average: `prepare_for_eval` must run before
loss, KL or saving is measured, or the numbers describe the wrong weights.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .config import CHOICES, ConfigError

OPTIMIZERS = CHOICES["optimizer"]
"""The names a trial's `optimizer` may take, kept with the other settings' allowed values (config needs no torch)."""


def build_optimizer(name: str, params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float):
    params = [p for p in params if p.requires_grad]
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False,
                         weight_decay=weight_decay)
    if name == "schedule_free_adamw":
        from schedulefree import AdamWScheduleFree

        return AdamWScheduleFree(params, lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay, warmup_steps=0)
    if name == "lion":
        from lion_pytorch import Lion

        return Lion(params, lr=lr, betas=(0.9, 0.99), weight_decay=weight_decay)
    raise ConfigError(f"optimizer: unknown '{name}'; allowed: {', '.join(OPTIMIZERS)}")


def uses_own_schedule(name: str) -> bool:
    """Schedule-free AdamW replaces the learning-rate schedule; an external decay would fight its averaging."""
    return name == "schedule_free_adamw"


def prepare_for_eval(optimizer) -> None:
    """Switch schedule-free optimizers to their averaged weights; a no-op for the others."""
    if hasattr(optimizer, "eval") and callable(optimizer.eval):
        optimizer.eval()
