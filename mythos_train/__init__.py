"""mythos_train: pretraining recurrent-depth transformers (prelude -> looped MoE block -> coda) with FSDP2 + EP.

Entry point: `python -m mythos_train {train,prepare,eval,export,bench,plan}` (console script `mythos-train`).
"""
