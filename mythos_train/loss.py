"""The training objective: summed token cross-entropy, normalised by the caller (global token count)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.profiler import record_function
from torch.distributed.tensor import DTensor

IGNORE_INDEX = -100
"Label value that contributes no loss and no token count."


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed token cross-entropy in fp32: logits [B, S, V], labels [B, S] -> [].

    Vocabulary-parallel logits (a DTensor, under tensor parallelism) need `parallel.loss_context`; their loss is
    a replicated DTensor, returned as the plain tensor every tp rank holds.
    """
    with record_function("mythos:loss"):
        loss = F.cross_entropy(
            logits.flatten(0, 1).float(), labels.flatten(), reduction="sum", ignore_index=IGNORE_INDEX
        )
        return loss.to_local() if isinstance(loss, DTensor) else loss


def batch_keys(document_masking: bool) -> tuple[str, ...]:
    """The batch tensors a forward and its loss read (those present): doc_starts only with document masking."""
    return ("input_ids", "labels", "loss_mask") + (("doc_starts",) if document_masking else ())


def loss_labels(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The batch's labels [B, S] with every position its loss_mask [B, S] (if any) excludes set to IGNORE_INDEX:
    masked positions then add nothing to the loss, its normalisation or the token counts."""
    labels = batch["labels"]
    if "loss_mask" not in batch:
        return labels
    return labels.masked_fill(~batch["loss_mask"], IGNORE_INDEX)


def token_count(labels: torch.Tensor) -> torch.Tensor:
    """Tokens that count towards the loss (on device, no host sync)."""
    return (labels != IGNORE_INDEX).sum()
