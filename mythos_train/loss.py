"""The training objective: summed token cross-entropy, normalised by the caller (global token count)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.profiler import record_function
from torch.distributed.tensor import DTensor

IGNORE_INDEX = -100
"Label value that contributes no loss and no token count."


class _CrossEntropySum(torch.autograd.Function):
    """F.cross_entropy(reduction="sum", ignore_index=IGNORE_INDEX) of logits [N, V] and labels [N], in fp32.

    The forward writes the gradient, softmax - one_hot, over its own log-probabilities, and backward scales it in
    place (by 0 on ignored rows): autograd's cross-entropy instead zero-fills one fresh [N, V] tensor for NLL's
    gradient and writes log_softmax's into another, ~10% of the bench step on CPU and two [N, V] buffers at the
    step's memory peak. Its backward runs once (a second one, under retain_graph, is refused by autograd) and is not
    differentiable (create_graph is refused too).
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        grad = torch.log_softmax(logits.float(), dim=-1)  # [N, V] fp32 log-probabilities, then their gradient
        valid = (labels != IGNORE_INDEX).unsqueeze(1)  # [N, 1]
        targets = labels.unsqueeze(1).where(valid, 0)  # [N, 1]
        loss = grad.gather(1, targets).neg().where(valid, 0).sum()
        valid = valid.to(grad.dtype)  # [N, 1]: 1, or 0 on ignored rows
        grad.exp_().scatter_add_(1, targets, -valid)  # softmax - one_hot; ignored rows are zeroed by backward's scale
        ctx.save_for_backward(grad, valid)
        ctx.logits_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        if torch.is_grad_enabled():  # create_graph: the gradient below is a constant, its own gradient would be lost
            raise RuntimeError("cross_entropy_sum has no double backward (create_graph=True): use F.cross_entropy")
        grad, valid = ctx.saved_tensors
        return grad.mul_(valid * grad_loss).to(ctx.logits_dtype), None


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed token cross-entropy in fp32: logits [B, S, V], labels [B, S] -> [].

    Vocabulary-parallel logits (a DTensor, under tensor parallelism) need `parallel.loss_context`; their loss is
    a replicated DTensor, returned as the plain tensor every tp rank holds.
    """
    with record_function("mythos:loss"):
        logits, labels = logits.flatten(0, 1), labels.flatten()  # [N, V], [N]
        if isinstance(logits, DTensor) or not (torch.is_grad_enabled() and logits.requires_grad):
            loss = F.cross_entropy(logits.float(), labels, reduction="sum", ignore_index=IGNORE_INDEX)
            return loss.to_local() if isinstance(loss, DTensor) else loss
        return _CrossEntropySum.apply(logits, labels)


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
