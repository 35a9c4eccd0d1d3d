"""The training loss against autograd's own cross-entropy: loss and gradient, fp32 and bf16, ignored labels."""

import pytest
import torch
import torch.nn.functional as F

from mythos_train.loss import IGNORE_INDEX, cross_entropy_sum


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loss_and_gradient_equal_autograd_cross_entropy(dtype):
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11, dtype=dtype) * 4  # [B, S, V]
    labels = torch.randint(0, 11, (3, 5))
    labels[0, 1] = labels[2] = IGNORE_INDEX  # a masked position and a whole masked row
    ours, reference = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    loss = cross_entropy_sum(ours, labels)
    expected = F.cross_entropy(reference.flatten(0, 1).float(), labels.flatten(), reduction="sum", ignore_index=-100)
    (0.37 * loss).backward()
    (0.37 * expected).backward()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    assert ours.grad.dtype == dtype
    torch.testing.assert_close(ours.grad, reference.grad, rtol=1e-6, atol=1e-7)
    assert ours.grad[2].abs().max() == 0  # ignored rows get no gradient
    with torch.no_grad():
        torch.testing.assert_close(cross_entropy_sum(logits, labels), expected.detach(), rtol=1e-6, atol=1e-6)


def test_a_second_backward_or_double_backward_is_refused_not_wrong():
    logits = torch.randn(2, 4, 7, requires_grad=True)
    loss = cross_entropy_sum(logits, torch.randint(0, 7, (2, 4)))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad(cross_entropy_sum(logits, torch.randint(0, 7, (2, 4))), logits, create_graph=True)


def test_all_ignored_labels_give_zero_loss_and_gradient():
    logits = torch.randn(2, 3, 5, requires_grad=True)
    loss = cross_entropy_sum(logits, torch.full((2, 3), IGNORE_INDEX))
    loss.backward()
    assert loss.item() == 0.0 and not torch.signbit(loss) and logits.grad.abs().max() == 0
