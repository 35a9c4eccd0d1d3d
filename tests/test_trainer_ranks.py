"""The trainer's claims across ranks, each against one plain single-device model in the test process.

One job per world size (1; 2 with EP 2; 4 = HSDP 2 x 2 with EP 2) builds the real `Trainer` and reports:
- its consolidated initial weights: `build_model` promises the values of one unsharded process (seeded_init.py),
  so they must equal a plain `MythosModel` initialised with the same seed, bit for bit;
- the gradients and the gradient norm of one step on a fixed global batch, read before clipping: the loss is
  summed cross-entropy x dp_size / global tokens, so they must equal the plain model's mean cross-entropy
  gradient over the whole batch. Some tokens are ignored (-100), unevenly over ranks, so a per-rank mean or a
  wrong dp factor shows (AdamW and clipping would hide a rescaled gradient in the loss curve);
- the host syncs of a whole training step (test_trainer_syncs.py has the one-process count);
- the evaluator's loss at each loop count (also above model.max_loop_iters), against `F.cross_entropy` of the
  plain model, loaded with the step's weights, over the validation windows read by one world-size-1 loader.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from distributed_testing import run_distributed
from torch.distributed.tensor import DTensor
from trainer_testing import VOCAB, config_file, prepare_tiny_data, step_host_syncs

import parallel
from data_pipeline import build_loader
from mythos_train.config import load_config
from mythos_train.model import MythosModel

MESHES = {1: [], 2: ["--parallel.ep=2"], 4: ["--parallel.dp_replicate=2", "--parallel.ep=2"]}
GLOBAL_BATCH, SEQ = 4, 32  # windows per step over all ranks (divisible by every world size), tokens per window
LOOP_COUNTS = (1, 3, 6)  # 6 > model.max_loop_iters = 4 of the tiny job
COMMON = [
    "--checkpoint.enabled=false",
    "--metrics.tensorboard=false",
    "--metrics.loop_telemetry=false",
    "--eval.sample_tokens=0",
    "--eval.batches=2",
    f"--eval.loop_counts=[{', '.join(map(str, LOOP_COUNTS))}]",
    "--train.max_grad_norm=0.05",  # small enough that clipping acts: gradients are read before it
    "--train.depth_distribution=fixed",  # 1 gradient-free + 2 gradient iterations every step
    "--train.mean_depth=3",
]


def global_batch() -> dict[str, torch.Tensor]:
    """A fixed batch; ranks get rows in dp-rank order. Row 3 (the last rank's at world 4) keeps only 4 labels."""
    tokens = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=torch.Generator().manual_seed(5))
    labels = tokens[:, 1:].clone()  # [B, S]
    labels[3, 4:] = -100
    labels[0, :7] = -100
    return {"input_ids": tokens[:, :-1], "labels": labels}


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def consolidated(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer at its global shape (a collective: every rank calls it)."""
    return {name: full(t) for name, t in itertools.chain(model.named_parameters(), model.named_buffers())}


def rank_job(rank: int, world: int, config: str) -> dict:
    from mythos_train.distributed import init_distributed
    from mythos_train.trainer import Trainer

    cfg = load_config(config, COMMON + MESHES[world] + [f"--train.run_dir={config[:-5]}-world{world}"])
    trainer = Trainer(cfg, init_distributed(cfg))
    out = {"init": consolidated(trainer.model)}

    clip = parallel.clip_grad_norm_

    def read_then_clip(parameters, *args, **kwargs):
        parameters = list(parameters)
        names = {id(p): n for n, p in trainer.model.named_parameters()}
        out["grads"] = {names[id(p)]: full(p.grad) for p in parameters if p.grad is not None}
        return clip(parameters, *args, **kwargs)

    parallel.clip_grad_norm_ = read_then_clip
    try:
        share = GLOBAL_BATCH // trainer.dims.dp_size
        rows = slice(trainer.dims.dp_rank * share, (trainer.dims.dp_rank + 1) * share)
        step = trainer.train_step([{k: v[rows] for k, v in global_batch().items()}])
    finally:
        parallel.clip_grad_norm_ = clip
    trainer.step = 1
    two_micro_batches = trainer.next_micro_batches() + trainer.next_micro_batches()
    out["syncs"] = step_host_syncs(trainer, two_micro_batches)  # a second step: the first set up FSDP and AdamW
    out["second_depth"] = trainer.depth.sample(1)
    trainer.step = 2
    out |= {"step": step, "after_step": consolidated(trainer.model), "eval": trainer.evaluator.run(2)}
    trainer.close()
    return out


def plain_model(cfg, state: dict[str, torch.Tensor] | None = None) -> MythosModel:
    """One unsharded model: seeded like the trainer's (`torch.manual_seed(train.seed)`, then init_weights), or
    loaded with `state`."""
    model = MythosModel(cfg.model)
    with torch.no_grad():
        if state is None:
            torch.manual_seed(cfg.train.seed)
            model.init_weights()
        else:
            model.load_state_dict({k: v for k, v in state.items() if k in model.state_dict()}, strict=True)
    return model


def validation_windows(cfg, world: int) -> dict[str, torch.Tensor]:
    """The windows `world` ranks evaluate (eval.batches micro-batches each), read by one world-size-1 loader."""
    count = cfg.train.micro_batch_size * world
    loader = build_loader(cfg.data, split="val", seq_len=cfg.train.seq_len, micro_batch_size=count,
                          grad_accum_steps=1, dp_rank=0, dp_world_size=1)  # fmt: skip
    batches = list(itertools.islice(loader, cfg.eval.batches))
    loader.close()
    return {k: torch.cat([b[k] for b in batches]) for k in ("input_ids", "labels")}


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    data_dir = prepare_tiny_data(tmp_path_factory.mktemp("data"))
    config = config_file(data_dir, tmp_path_factory.mktemp("runs") / "job")
    results = {world: run_distributed(rank_job, world, str(config), timeout=600) for world in MESHES}
    return load_config(config, COMMON), results


@pytest.mark.slow
@pytest.mark.parametrize("world", sorted(MESHES))
def test_initial_weights_are_one_process_values_on_every_mesh(runs, world):
    cfg, results = runs
    expected = consolidated(plain_model(cfg))
    got = results[world][0]["init"]
    assert got.keys() == expected.keys()
    differ = [name for name, value in expected.items() if not torch.equal(got[name], value)]
    assert not differ, f"world {world} {MESHES[world]}: initial values differ from one process in {differ}"


@pytest.mark.slow
@pytest.mark.parametrize("world", sorted(MESHES))
def test_gradients_before_clipping_are_the_global_token_mean_gradient(runs, world):
    cfg, results = runs
    step = results[world][0]["step"]
    model = plain_model(cfg)
    batch = global_batch()
    logits = model(batch["input_ids"], n_nograd=step.n_nograd, n_grad=step.n_grad)
    loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
    loss.backward()
    expected = {name: p.grad for name, p in model.named_parameters()}
    norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in expected.values()])).item()

    assert step.loss == pytest.approx(loss.item(), rel=1e-5), f"world {world}: step loss"
    assert step.grad_norm == pytest.approx(norm, rel=1e-4), f"world {world}: gradient norm before clipping"
    assert norm > cfg.train.max_grad_norm  # the step clipped: the gradients below were read before that
    grads = results[world][0]["grads"]
    assert grads.keys() == expected.keys()
    errors = {name: relative_error(grads[name], g) for name, g in expected.items()}
    worst = max(errors, key=errors.get)
    assert errors[worst] < 1e-4, f"world {world}: gradient of {worst} off by {errors[worst]:.3g} (relative)"


@pytest.mark.slow
@pytest.mark.parametrize("world", sorted(MESHES))
def test_eval_loss_by_loop_count_is_cross_entropy_over_the_validation_windows(runs, world):
    cfg, results = runs
    model = plain_model(cfg, results[world][0]["after_step"]).eval()
    windows = validation_windows(cfg, world)
    expected = {}
    with torch.no_grad():
        for loops in LOOP_COUNTS:
            logits = model(windows["input_ids"], n_grad=loops)
            expected[loops] = F.cross_entropy(logits.flatten(0, 1), windows["labels"].flatten(), ignore_index=-100)
    for rank, result in enumerate(results[world]):
        assert result["eval"].keys() == expected.keys(), f"world {world} rank {rank}"
        for loops, value in expected.items():
            assert result["eval"][loops] == pytest.approx(value.item(), rel=1e-5), (
                f"world {world} rank {rank}: eval loss at {loops} loops"
            )


@pytest.mark.slow
@pytest.mark.parametrize("world", sorted(MESHES))
def test_host_syncs_of_a_whole_step(runs, world):
    """One per step (loss and gradient norm, read together); EP adds one per loop iteration of each micro-batch
    (its all-to-all split sizes), none in backward or in the activation-checkpoint recompute."""
    _, results = runs
    n_nograd, n_grad = results[world][0]["second_depth"]
    expected = 1 + (2 * (n_nograd + n_grad) if "--parallel.ep=2" in MESHES[world] else 0)  # 2 micro-batches
    for rank, result in enumerate(results[world]):
        assert result["syncs"] == {"tolist": expected}, f"world {world} rank {rank}: {result['syncs']}"
