"""The training step in one process (world-size-1 gloo group on an in-memory store, no torchrun).

Checked against independent computations: the step loss against a plain cross-entropy over the same tokens, the
gradient of grad-accumulated micro-batches against one big batch, skipped steps against a parameter snapshot.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from trainer_testing import prepare_tiny_data, tiny_config

from mythos_train.distributed import destroy_distributed, init_distributed
from mythos_train.trainer import NonFiniteError, Trainer


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepare_tiny_data(tmp_path_factory.mktemp("data"))


@pytest.fixture
def make_trainer():
    trainers = []

    def make(cfg):
        trainer = Trainer(cfg, init_distributed(cfg))
        trainers.append(trainer)
        return trainer

    yield make
    for trainer in trainers:
        trainer.close()
    destroy_distributed()


def _local(t: torch.Tensor) -> torch.Tensor:
    return (t.to_local() if isinstance(t, DTensor) else t).detach().clone()


def _snapshot(trainer: Trainer) -> dict[str, torch.Tensor]:
    state = {n: _local(p) for n, p in trainer.model.named_parameters()}
    state |= {f"buffer:{n}": _local(b) for n, b in trainer.model.named_buffers()}
    return state


def test_loss_is_global_token_mean_and_accumulation_matches_one_batch(data_dir, tmp_path, make_trainer):
    fixed = ["--train.depth_distribution=fixed", "--train.mean_depth=2", "--checkpoint.enabled=false"]
    accum = make_trainer(tiny_config(data_dir, tmp_path / "a", fixed + ["--train.grad_accum_steps=2"]))
    whole = make_trainer(tiny_config(data_dir, tmp_path / "b", fixed + ["--train.micro_batch_size=4"]))
    micro = accum.next_micro_batches()
    micro[1]["labels"][0, :20] = -100  # ignored tokens must drop out of numerator and denominator
    batch = {k: torch.cat([mb[k] for mb in micro]) for k in ("input_ids", "labels")}

    grads = {}  # names first: after a no_grad forward FSDP's root holds unsharded parameters until backward
    for key, trainer in (("accum", accum), ("whole", whole)):
        names = {id(p): n for n, p in trainer.model.named_parameters()}

        def capture(optimizer, args, kwargs, key=key, names=names):
            grads[key] = {names[id(p)]: _local(p.grad) for g in optimizer.param_groups for p in g["params"]}

        trainer.optimizer.register_step_pre_hook(capture)

    with torch.no_grad():  # independent reference: mean CE over the counted tokens of the whole step
        logits = accum.model(batch["input_ids"], n_nograd=0, n_grad=2)
        reference = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100).item()
    a = accum.train_step(micro)
    b = whole.train_step([batch])
    assert (a.n_nograd, a.n_grad) == (0, 2)
    assert a.loss == pytest.approx(reference, rel=1e-5)
    assert b.loss == pytest.approx(reference, rel=1e-5)
    assert a.grad_norm == pytest.approx(b.grad_norm, rel=1e-4)  # norm scales with the loss normalisation
    assert grads["accum"].keys() == grads["whole"].keys()
    for name, grad in grads["accum"].items():
        torch.testing.assert_close(grad, grads["whole"][name], rtol=1e-4, atol=1e-8, msg=name)


def test_non_finite_step_is_skipped_counted_and_stops_the_run(data_dir, tmp_path, make_trainer):
    trainer = make_trainer(
        tiny_config(data_dir, tmp_path / "run", ["--train.max_skipped_steps=2", "--checkpoint.enabled=false"])
    )
    assert not trainer.train_step(trainer.next_micro_batches()).skipped
    trainer.step += 1
    trainer.model.recurrent.block.moe.router.expert_bias.fill_(0.5)  # skipped steps must not move it either
    before = _snapshot(trainer)
    adam_steps = [s["step"].clone() for s in trainer.optimizer.state.values()]
    last_epoch = trainer.lr_scheduler.last_epoch

    poison = trainer.model.norm.register_forward_hook(lambda module, inputs, out: out * float("nan"))
    result = trainer.train_step(trainer.next_micro_batches())
    assert result.skipped and math.isnan(result.loss)
    assert (trainer.skipped_in_a_row, trainer.skipped_total) == (1, 1)
    after = _snapshot(trainer)
    for name in before:
        assert torch.equal(before[name], after[name]), f"{name} changed in a skipped step"
    assert [s["step"] for s in trainer.optimizer.state.values()] == adam_steps
    assert trainer.lr_scheduler.last_epoch == last_epoch
    assert all(p.grad is None for p in trainer.model.parameters())
    assert not trainer.step_fn.balancer.counts.any()

    trainer.step += 1
    with pytest.raises(NonFiniteError, match="2 consecutive steps.*max_skipped_steps = 2"):
        trainer.train_step(trainer.next_micro_batches())

    poison.remove()
    trainer.skipped_in_a_row = 0
    result = trainer.train_step(trainer.next_micro_batches())
    assert not result.skipped and math.isfinite(result.loss)
    assert trainer.skipped_total == 2
    assert not torch.equal(before["tok_embeddings.weight"], _local(trainer.model.tok_embeddings.weight))


def test_vocab_mismatch_is_a_clear_error(data_dir, tmp_path):
    from mythos_train.config import ConfigError
    from mythos_train.trainer import check_vocab

    cfg = tiny_config(data_dir, tmp_path / "run", ["--model.vocab_size=1000"])
    with pytest.raises(ConfigError, match=r"model.vocab_size \(1000\) != the tokenizer's vocabulary \(512"):
        check_vocab(cfg)
