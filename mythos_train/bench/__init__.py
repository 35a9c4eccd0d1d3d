"""Benchmarks the CLI runs: `throughput` (`python -m mythos_train bench`, our step vs open-mythos) and `sweep`
(`bench --sweep`: the trainer's step over checkpointing policy x micro-batch x loop depth)."""
