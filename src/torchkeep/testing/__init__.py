"""Test helpers for training code: prove that a training script resumes exactly.

``assert_resumes_exactly(train_fn, stop_at=...)`` runs ``train_fn`` straight through in a fresh
process, and again interrupted at a checkpoint and resumed in new processes, then checks that
both runs logged bit-identical losses and ended with bit-identical checkpoints. A resume that
forgets the RNG, the LR scheduler, the DataLoader order or the position inside an epoch shows up
as the first loss (or tensor element) that differs.
"""

from torchkeep.testing._child import TrainProcessError
from torchkeep.testing._resume import ResumeReport, assert_resumes_exactly

__all__ = ["ResumeReport", "TrainProcessError", "assert_resumes_exactly"]
