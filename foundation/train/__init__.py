"""The shared trainer: distributed set-up, the loop, checkpoints, preemption, metrics, export.

from foundation.train import train, load_pretrained
result = train(cfg)                     # one process's share of a (multi-process) run
model, cfg, family = load_pretrained("runs/xval-tiny")   # run dir, step-N folder or model.pt
"""

from foundation.train.optim import register_optimizer
from foundation.train.preemption import EXIT_DIVERGED, EXIT_PREEMPTED
from foundation.train.pretrained import load_pretrained
from foundation.train.trainer import TrainingDiverged, TrainResult, train

__all__ = [
    "EXIT_DIVERGED",
    "EXIT_PREEMPTED",
    "TrainResult",
    "TrainingDiverged",
    "load_pretrained",
    "register_optimizer",
    "train",
]
