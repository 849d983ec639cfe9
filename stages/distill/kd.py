"""Knowledge distillation (Hinton et al. 2015) as the pruned-data student's loss.

    L = (1 - lambda) * CE(student, y) + lambda * tau^2 * KL(softmax(t / tau) || softmax(s / tau))

The tau^2 keeps the soft term's gradient at the scale of the hard term's as tau grows. ``auto_kd_weight``
sets lambda from the kept fraction f: Ben-Baruch et al. ("Distilling the Knowledge in Data Pruning")
find that the best KD weight grows as the kept fraction shrinks — a small weight near 100% kept, a
large one near 10%. Our rule, lambda = clip(1 - f, 0.1, 0.9), follows that finding (0.9 at f = 0.1,
0.5 at f = 0.5, 0.1 at f >= 0.9); it is an interpolation of the finding, not the paper's table.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from deploypipe import batches as B
from deploypipe.training import Callback, TrainBatch


def auto_kd_weight(kept_fraction: float) -> float:
    return min(0.9, max(0.1, 1.0 - kept_fraction))


def _wide(x: torch.Tensor) -> torch.Tensor:
    """Half-precision logits in float32 for the loss; float32 and float64 as they are."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, y: Optional[torch.Tensor], weight: float,
            temperature: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """The batch mean of (1 - weight) * CE(student, y) + weight * tau^2 * KL(p_teacher,tau || p_student,tau)."""
    t = temperature
    student = _wide(student)
    teacher = _wide(teacher).to(student.dtype)
    soft = F.kl_div(F.log_softmax(student / t, 1), F.log_softmax(teacher / t, 1), log_target=True,
                    reduction="batchmean") * t * t
    if weight >= 1.0 or y is None:
        return soft
    hard = F.cross_entropy(student, y, label_smoothing=label_smoothing)
    return (1.0 - weight) * hard + weight * soft


class KnowledgeDistillation(Callback):
    """The KD loss for the loop: the teacher's logits for the batch the student sees — read from a cache
    by example index (``cache``: logits of the un-augmented training images, valid when training does
    not augment), or computed on the fly on the same (augmented, noisy) inputs."""

    def __init__(self, teacher: nn.Module, weight: float, temperature: float, cache: Optional[torch.Tensor] = None,
                 label_smoothing: float = 0.0):
        self.teacher = teacher.eval()
        self.weight, self.temperature, self.cache = weight, temperature, cache
        self.label_smoothing = label_smoothing

    @torch.no_grad()
    def teacher_logits(self, batch: TrainBatch) -> torch.Tensor:
        if self.cache is not None and batch.ids is not None and batch.copies == 1:
            return self.cache[batch.ids].to(batch.y.device)
        return B.output_tensor(B.call(self.teacher, batch.x)).float()

    def loss(self, logits: torch.Tensor, batch: TrainBatch) -> Optional[torch.Tensor]:
        if self.weight <= 0:
            return None  # plain cross-entropy: exactly the loop's own loss
        return kd_loss(logits, self.teacher_logits(batch), batch.y, self.weight, self.temperature,
                       self.label_smoothing)


@torch.no_grad()
def cache_logits(teacher: nn.Module, images, device: torch.device | str, batch_size: int = 512) -> torch.Tensor:
    """The teacher's logits for every image of an ImageSet, in order (once, before training)."""
    teacher.eval()
    return torch.cat([teacher(x.to(device)).float() for x, _ in images.batches(batch_size)])
