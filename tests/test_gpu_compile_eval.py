"""The GPU presets' path on CPU: compiled bf16 blocks through training, evaluation and KV-cache sampling.

Every real preset compiles its blocks (fullgraph) and runs bf16; `configs/debug.toml` does neither, so this is the
only test that drives the compiled blocks through `generate`'s KV cache (issue 13, point 1: `is_causal` became a
symbolic bool there and SDPA raised at the first evaluation). The compiled KV-cache path is checked against the
same weights run eagerly.
"""

from __future__ import annotations

import pytest
import torch
from model_testing import tiny_model_config
from trainer_testing import prepare_tiny_data, tiny_config

from mythos_train.distributed import destroy_distributed, init_distributed
from mythos_train.model import MythosModel
from mythos_train.model.attention import causal_sdpa
from mythos_train.trainer import Trainer
from parallel.compile import apply_compile


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepare_tiny_data(tmp_path_factory.mktemp("data"))


def test_causal_sdpa_masks_agree_with_a_dense_mask():
    """Prefill, one-token decode and a chunk after a cache against one explicit bottom-right causal mask."""
    torch.manual_seed(0)
    for past, T in [(0, 5), (4, 1), (3, 4)]:
        q, k, v = torch.randn(1, 2, T, 8), torch.randn(1, 2, past + T, 8), torch.randn(1, 2, past + T, 8)
        mask = torch.ones(T, past + T, dtype=torch.bool).tril(diagonal=past)
        scores = (q @ k.transpose(-1, -2) * 0.3).masked_fill(~mask, float("-inf"))
        torch.testing.assert_close(causal_sdpa(q, k, v, 0.3, past), scores.softmax(-1) @ v)


@pytest.mark.slow
def test_compiled_bf16_trains_evaluates_and_samples(data_dir, tmp_path):
    """Two steps, evaluation at step 2 with a 4-token sample: the run the GPU presets make at eval.every_steps."""
    overrides = [
        "--parallel.compile=true",
        "--parallel.param_dtype=bfloat16",
        "--train.steps=2",
        "--eval.every_steps=2",
        "--eval.loop_counts=[1,2]",
        "--checkpoint.every_steps=100",
    ]
    cfg = tiny_config(data_dir, tmp_path / "run", overrides)
    trainer = Trainer(cfg, init_distributed(cfg))
    try:
        trainer.train()
        assert set(trainer.last_eval) == {1, 2}
        assert trainer.evaluator.sample().startswith("def main(")
    finally:
        trainer.close()
        destroy_distributed()


@pytest.mark.slow
def test_compiled_blocks_decode_from_the_kv_cache_as_eager_ones():
    """Prefill then one-token decodes through compiled blocks (fp32, experts eager: torch's fake grouped_mm is bf16
    only): the cache lengths turn symbolic after the second shape, where `is_causal` used to become a SymBool."""
    torch.manual_seed(0)
    model = MythosModel(tiny_model_config(coda_layers=0)).eval()
    tokens = torch.randint(0, 64, (1, 7))

    def prefill_and_decode() -> list[torch.Tensor]:
        cache: dict = {}
        logits = [model(tokens[:, :5], n_grad=1, kv_cache=cache)]
        return logits + [model(tokens[:, i : i + 1], n_grad=1, kv_cache=cache, start_pos=i) for i in (5, 6)]

    with torch.no_grad():
        eager = prefill_and_decode()
        apply_compile(model, compile_experts=False)
        with torch._dynamo.config.patch(recompile_limit=16):
            compiled = prefill_and_decode()
    for c, e in zip(compiled, eager):
        torch.testing.assert_close(c, e, rtol=1e-4, atol=1e-5)
