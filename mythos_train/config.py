"""One tree of typed dataclasses for a whole job, loaded from TOML with `--section.field=value` overrides.

Every field carries a one-line docstring (the string literal under it); `python -m mythos_train train --help`
prints them. All validation happens here, before any process group starts, so a bad config never costs a
rendezvous: unknown keys (with the closest valid names), wrong types, and semantic conflicts.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from data_pipeline.config import DataConfig
from mythos_train.errors import ConfigError
from parallel.config import ParallelConfig, mesh_sizes


@dataclass
class ModelConfig:
    """Architecture. Names follow open-mythos 0.5.0's `MythosConfig` so presets and exports line up."""

    vocab_size: int = 8192
    "Token vocabulary size; must equal the tokenizer's."
    dim: int = 256
    "Hidden size of every block."
    n_heads: int = 8
    "Query heads (MLA and GQA)."
    n_kv_heads: int = 2
    "Key/value heads for GQA (ignored by MLA)."
    max_seq_len: int = 1024
    "Longest sequence RoPE tables are built for (training windows and generation)."
    max_loop_iters: int = 16
    "Loop steps with their own depth-LoRA scale; deeper inference reuses the last one."
    prelude_layers: int = 2
    "Dense blocks run once before the loop."
    coda_layers: int = 2
    "Dense blocks run once after the loop."
    attn_type: Literal["mla", "gqa"] = "mla"
    "Attention: DeepSeek-V2 multi-latent ('mla') or grouped-query ('gqa')."
    kv_lora_rank: int = 64
    "MLA: width of the cached KV latent."
    q_lora_rank: int = 128
    "MLA: width of the query latent."
    qk_rope_head_dim: int = 16
    "MLA: per-head query/key dims that get RoPE."
    qk_nope_head_dim: int = 32
    "MLA: per-head query/key dims without RoPE."
    v_head_dim: int = 32
    "MLA: per-head value dim."
    n_experts: int = 64
    "Fine-grained routed experts in the looped block's MoE."
    n_shared_experts: int = 2
    "Always-on shared experts (each expert_dim * n_experts_per_tok wide, as in open-mythos)."
    n_experts_per_tok: int = 4
    "Routed experts each token is sent to (top-k)."
    expert_dim: int = 64
    "Hidden width of one routed expert."
    dense_ffn_dim: int = 0
    "Hidden width of the prelude/coda SwiGLU; 0 means dim * 4 // 3 (open-mythos)."
    use_act: bool = False
    "ACT halting weights the loop outputs; off = the last state. Off by default: OpenMythos PR #58 saw ACT + fixed depth blow up at 16 loops (ppl 57.9 -> 170.7) while random depth without ACT stayed flat to 64."
    act_threshold: float = 0.99
    "ACT: cumulative halting probability at which a position stops."
    injection: Literal["lti", "parcae"] = "lti"
    "Loop update: 'lti' = A*h + B*e (open-mythos, diagonal B); 'parcae' = exp(-dt*A)*h + dt*(B e) with a full B."
    injection_b_init: float = 0.1
    "Initial value of the injection's diagonal B, how strongly the prelude output e enters each step (open-mythos: 0.1)."
    initial_state: Literal["prelude", "zero", "noise"] = "prelude"
    "The loop's starting state h_0: the prelude output e (open-mythos), zeros, or fresh truncated-normal noise of std sqrt(2 / (5 dim)) every forward (Huginn); e is injected every step either way."
    loop_embedding: bool = True
    "Add the sinusoidal loop-index embedding to the block input (open-mythos); off: every step sees the same function of (h, e)."
    lora_rank: int = 8
    "Rank of the depth-wise LoRA on the looped block's output; 0 = no depth LoRA."
    rope_theta: float = 500000.0
    "RoPE base frequency."
    norm_eps: float = 1e-6
    "RMSNorm epsilon."
    init_std: float = 0.02
    "Std of the normal init of linear and embedding weights (open-mythos)."

    @property
    def ffn_dim(self) -> int:
        return self.dense_ffn_dim or self.dim * 4 // 3

    @property
    def shared_expert_dim(self) -> int:
        """Width of the fused shared-expert SwiGLU: n_shared_experts of expert_dim * top_k each (open-mythos)."""
        return self.n_shared_experts * self.expert_dim * self.n_experts_per_tok


@dataclass
class TrainConfig:
    """The optimisation loop and the per-step loop-depth sampler."""

    run_dir: str = "runs/debug"
    "Where TensorBoard events, plots, traces and (by default) checkpoints go."
    steps: int = 200
    "Optimizer steps to train."
    seq_len: int = 256
    "Tokens per training window."
    micro_batch_size: int = 8
    "Windows per rank per forward/backward."
    grad_accum_steps: int = 1
    "Micro-batches per optimizer step (global batch = micro * accum * data-parallel ranks)."
    seed: int = 0
    "Seed for init, depth sampling and data order."
    device: Literal["auto", "cpu", "cuda"] = "auto"
    "'auto' = CUDA when available."
    depth_distribution: Literal["fixed", "uniform", "poisson-lognormal", "poisson"] = "poisson-lognormal"
    "Per-step loop depth: fixed, uniform[min,max], Huginn's Poisson-LogNormal (sigma 0.5), or Parcae's Poisson; random depth keeps more loops at inference stable (PR #58)."
    mean_depth: float = 4.0
    "Expected total loop depth per step (gradient-free + gradient iterations), before clamping to [min_depth, max_depth]."
    min_depth: int = 1
    "Smallest total depth drawn."
    max_depth: int = 16
    "Largest total depth drawn (caps the distribution's tail)."
    backprop_depth: int = 4
    "Most iterations that get gradients (truncated backprop: the last k of the loop)."
    depth_warmup_steps: int = 0
    "Optimizer steps at the start of training run at depth 1 (one iteration, with gradients) before the depth distribution takes over: the block first learns what one iteration can do, then to repeat it (docs/science.md: looped training from scratch stayed at the canary's baseline where this curriculum reached 0.95)."
    router_bias_rate: float = 1e-3
    "Aux-loss-free balancing: bias += rate * sign(mean_load - load) per step (DeepSeek-V3)."
    max_grad_norm: float = 1.0
    "Clip the global gradient norm (dense and expert meshes together); 0 = off."
    max_skipped_steps: int = 5
    "Stop with an error after this many non-finite steps in a row."
    log_every: int = 10
    "Console and TensorBoard scalars every N steps."
    stop_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGINT", "SIGUSR1"])
    "Signals that make every rank finish its step, save a checkpoint and exit with status 75 (start again to resume): SIGTERM from SLURM/Kubernetes, SIGINT (Ctrl-C), SIGUSR1 from SLURM's --signal."
    document_masking: bool = False
    "Packed documents attend only within themselves (block-diagonal causal attention, positions restarting at each document); needs data.return_doc_boundaries."


@dataclass
class OptimConfig:
    """AdamW with decoupled weight decay (2-D weights only) and a warmup + decay LR schedule."""

    lr: float = 3e-3
    "Peak learning rate."
    min_lr_ratio: float = 0.1
    "Final LR as a fraction of the peak."
    warmup_steps: int = 20
    "Linear warmup steps."
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    "Decay after warmup: cosine, warmup-stable-decay, or constant."
    wsd_decay_fraction: float = 0.2
    "WSD: fraction of steps spent in the final linear decay."
    weight_decay: float = 0.1
    "AdamW weight decay on matrices; norms, biases, embeddings' scales and 1-D params get none."
    beta1: float = 0.9
    "AdamW beta1."
    beta2: float = 0.95
    "AdamW beta2."
    eps: float = 1e-8
    "AdamW epsilon."


@dataclass
class CheckpointConfig:
    """Sharded torch.distributed.checkpoint saves; resume picks the newest complete one."""

    enabled: bool = True
    "Save checkpoints."
    folder: str = ""
    "Checkpoint directory; empty = <run_dir>/checkpoints."
    every_steps: int = 50
    "Save every N steps (and at the end)."
    keep_last: int = 3
    "Complete checkpoints kept (of steps up to the one just saved); older ones are deleted."
    async_save: bool = False
    "Save in the background on a dedicated gloo group, overlapping the next steps."
    resume: bool = True
    "Resume from the newest complete checkpoint in folder whose files match the checksums in its COMPLETE marker (an older one if the newest is damaged), if any."
    load_step: int = -1
    "Resume from the checkpoint of exactly this step (an error if it is missing or damaged); -1 = the newest that verifies."
    init_from: str = ""
    "Start a new run from another run's weights: a checkpoints folder (its newest verified step) or one step-N folder; model weights only (fresh optimizer, schedule, step 0, this run's data), for a curriculum stage. Ignored once this run has a checkpoint of its own (a restart resumes that)."
    init_from_changes: list[str] = field(default_factory=list)
    "[model] fields this run may set differently from init_from's checkpoint (a stage that switches a recipe choice, e.g. ['use_act', 'lora_rank']): parameters only the checkpoint has are dropped and parameters only this model has keep their init, both logged; a parameter whose shape changed is an error."


@dataclass
class MetricsConfig:
    """TensorBoard and console metrics."""

    tensorboard: bool = True
    "Write TensorBoard event files under <run_dir>/tb."
    loop_telemetry: bool = True
    "Log per-iteration ||h_t||, expert load and ACT halting depth."
    cpu_peak_tflops: float = 0.0
    "Peak FLOP/s for MFU on CPU, in TFLOP/s; 0 = measure an fp32 matmul at startup."


@dataclass
class ProfileConfig:
    """torch.profiler schedule; traces land in <run_dir>/profile/rank<N>."""

    enabled: bool = False
    "Run torch.profiler."
    wait: int = 5
    "Profiler schedule: steps skipped first."
    warmup: int = 1
    "Profiler schedule: warmup steps."
    active: int = 2
    "Profiler schedule: recorded steps."
    repeat: int = 1
    "Profiler schedule: cycles (0 = until the end)."
    memory_snapshot: bool = False
    "Dump a CUDA memory snapshot (GPU only)."


@dataclass
class EvalConfig:
    """Validation loss vs inference loop count: the signature plot of a recurrent-depth model."""

    every_steps: int = 100
    "Evaluate every N steps (and at the end); 0 = only at the end."
    loop_counts: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32])
    "Inference loop counts to measure validation loss at."
    batches: int = 4
    "Validation micro-batches per loop count."
    sample_prompt: str = "def main("
    "Prompt for the greedy sample logged as text."
    sample_tokens: int = 48
    "Tokens to generate for the sample."
    sample_loops: int = 8
    "Loop count used for the sample."


@dataclass
class CanaryConfig:
    """The depth canary (`python -m mythos_train canary`): chained assignments whose answer needs exactly d hops."""

    dir: str = "data/canary_text"
    "Where the canary command writes the training text (programs.parquet) and the evaluation set (eval.jsonl)."
    programs: int = 200_000
    "Training programs written (prepare holds out data.val_fraction of them)."
    train_hops: int = 4
    "D_train: training programs need 1..D_train hops; evaluation covers 1..2*D_train (beyond: extrapolation)."
    distractor_chains: int = 2
    "Chains besides the queried one in every program, each 1..train_hops assignments long."
    queries: int = 1
    "print queries per training program, each with its answer: the first needs exactly d hops, the others ask for distinct other variables of the program (more supervised tokens per window; needs data.answer_end = ';' so each answer ends at the next query). Evaluation programs ask one."
    eval_programs: int = 64
    "Evaluation programs per hop count (divided among the data-parallel ranks)."
    seed: int = 0
    "Seed of the programs; the evaluation set uses a different stream and excludes every training program."
    accuracy: bool = False
    "Measure answer accuracy by hops x inference loops at every evaluation (needs the canary's eval.jsonl)."
    variables: int = 26
    "Variable names programs draw from (the first N letters): fewer names make fewer statement pieces (N * (N + 9)), each seen more often in training; at least the (2 + distractor_chains) * train_hops variables of the longest evaluation program."


@dataclass
class JobConfig:
    """The whole job."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    canary: CanaryConfig = field(default_factory=CanaryConfig)


# --------------------------------------------------------------------------- loading


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Check (TOML) or parse (CLI string) `value` as type `tp`; raise ConfigError naming `where`."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {list(choices)}")
        return value
    if origin in (list, tuple):
        (item_tp,) = typing.get_args(tp)[:1]
        if isinstance(value, str):
            value = [v.strip().strip("'\"") for v in value.strip("[]").split(",") if v.strip()]  # [a, 'b'] alike
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        return [_convert(v.strip() if isinstance(v, str) else v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        return _convert(value, next(a for a in typing.get_args(tp) if a is not type(None)), where)
    if tp is bool:
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp in (int, float):
        if isinstance(value, str):
            try:
                text = value.strip()
                value = float(text) if text.lower().lstrip("+-") in ("inf", "nan") else ast.literal_eval(text)
            except (ValueError, SyntaxError):
                raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}") from None
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or (tp is int and not float(value).is_integer())
        ):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
        if not math.isfinite(value):  # TOML's inf/nan, or a literal too big for a float (1e999)
            raise ConfigError(f"{where}: {value!r} is not a finite number")
        return tp(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported field type {tp}")


def _set_section(section: Any, values: dict, where: str) -> None:
    hints = typing.get_type_hints(type(section))
    names = [f.name for f in dataclasses.fields(section)]
    for key, value in values.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=3, cutoff=0.5)
            hint = f" (did you mean {', '.join(close)}?)" if close else f" (valid: {', '.join(names)})"
            raise ConfigError(f"{where}: unknown key '{key}'{hint}")
        setattr(section, key, _convert(value, hints[key], f"{where}.{key}"))


def _apply(cfg: JobConfig, tree: dict, where: str) -> None:
    sections = [f.name for f in dataclasses.fields(cfg)]
    for name, values in tree.items():
        if name not in sections:
            close = difflib.get_close_matches(name, sections, n=3, cutoff=0.5)
            hint = f" (did you mean {', '.join(close)}?)" if close else f" (valid: {', '.join(sections)})"
            raise ConfigError(f"{where}: unknown section '[{name}]'{hint}")
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: '{name}' must be a table [{name}]")
        _set_section(getattr(cfg, name), values, f"{where}: {name}" if where.endswith(".toml") else name)


def parse_overrides(args: list[str]) -> dict:
    """`--section.field=value` (or `--section.field value`) into a nested dict of strings."""
    tree: dict = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ConfigError(f"command line: expected --section.field=value, got {arg!r}")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
        elif i + 1 < len(args):
            key, value = arg[2:], args[i + 1]
            i += 1
        else:
            raise ConfigError(f"command line: {arg} needs a value")
        section, name = key.split(".", 1)
        tree.setdefault(section, {})[name] = value
        i += 1
    return tree


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> JobConfig:
    """Defaults <- TOML file <- command-line overrides. Does not validate against a world size."""
    cfg = JobConfig()
    if path is not None:
        path = Path(path)
        try:
            tree = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path}: invalid TOML: {err}") from None
        _apply(cfg, tree, str(path))
    _apply(cfg, parse_overrides(overrides or []), "command line")
    return cfg


def to_dict(cfg: JobConfig) -> dict:
    """Plain nested dict (for logging the resolved config next to the run)."""
    return dataclasses.asdict(cfg)


def field_docs(section_type: type) -> dict[str, str]:
    """Field name -> its docstring literal, read from the class source (for --help)."""
    import inspect

    tree = ast.parse(inspect.getsource(section_type))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = str(nxt.value.value)
    return docs


# --------------------------------------------------------------------------- semantic checks


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def check_tensor_parallel(model: ModelConfig, tp: int) -> None:
    """Every width tensor parallelism splits must divide by tp (names the field)."""
    widths = {"n_heads": model.n_heads, "dense_ffn_dim (ffn_dim)": model.ffn_dim, "vocab_size": model.vocab_size}
    if model.attn_type == "gqa":
        widths["n_kv_heads"] = model.n_kv_heads
    if model.shared_expert_dim:
        widths["shared_expert_dim (expert_dim * n_experts_per_tok * n_shared_experts)"] = model.shared_expert_dim
    for name, width in widths.items():
        _check(width % tp == 0, f"model.{name} ({width}) must be divisible by parallel.tp ({tp})")


def validate(cfg: JobConfig, world_size: int = 1) -> None:
    """Every cross-field rule, raised as ConfigError naming the field(s), before any process group exists."""
    model, train, parallel = cfg.model, cfg.train, cfg.parallel
    for name in (
        "vocab_size",
        "dim",
        "n_heads",
        "n_experts",
        "n_experts_per_tok",
        "expert_dim",
        "max_loop_iters",
        "max_seq_len",
    ):
        _check(getattr(model, name) > 0, f"model.{name} must be > 0")
    _check(
        model.prelude_layers >= 0 and model.coda_layers >= 0, "model.prelude_layers and model.coda_layers must be >= 0"
    )
    _check(
        model.dim % model.n_heads == 0, f"model.dim ({model.dim}) must be divisible by model.n_heads ({model.n_heads})"
    )
    if model.attn_type == "gqa":
        _check(
            model.n_heads % model.n_kv_heads == 0,
            f"model.n_heads ({model.n_heads}) must be divisible by model.n_kv_heads ({model.n_kv_heads})",
        )
        _check(
            (model.dim // model.n_heads) % 2 == 0,
            f"model.dim / model.n_heads ({model.dim // model.n_heads}) must be even for RoPE",
        )
    else:
        _check(
            model.qk_rope_head_dim % 2 == 0, f"model.qk_rope_head_dim ({model.qk_rope_head_dim}) must be even for RoPE"
        )
    _check(
        model.dim // 8 >= 2 and (model.dim // 8) % 2 == 0,
        f"model.dim ({model.dim}) must give an even loop-embedding width dim // 8",
    )
    for name in ("dim", "expert_dim"):  # so a config that runs on CPU in fp32 runs on GPU in bf16 unchanged
        _check(
            getattr(model, name) % 8 == 0,
            f"model.{name} ({getattr(model, name)}) must be a multiple of 8: the bf16 grouped GEMM of the experts needs 16-byte-aligned rows",
        )
    _check(
        model.n_experts_per_tok <= model.n_experts,
        f"model.n_experts_per_tok ({model.n_experts_per_tok}) must be <= model.n_experts ({model.n_experts})",
    )
    _check(0.0 < model.act_threshold <= 1.0, "model.act_threshold must be in (0, 1]")
    _check(model.lora_rank >= 0, f"model.lora_rank ({model.lora_rank}) must be >= 0 (0 = no depth LoRA)")
    model_fields = {f.name for f in dataclasses.fields(model)}
    for name in cfg.checkpoint.init_from_changes:
        _check(name in model_fields, f"checkpoint.init_from_changes: {name!r} is not a [model] field")
    _check(parallel.timeout_s > 0, f"parallel.timeout_s ({parallel.timeout_s}) must be > 0")
    _check(
        parallel.shared_expert_chunks >= 1,
        f"parallel.shared_expert_chunks ({parallel.shared_expert_chunks}) must be >= 1",
    )
    _check(
        model.n_experts % parallel.ep == 0,
        f"model.n_experts ({model.n_experts}) must be divisible by parallel.ep ({parallel.ep})",
    )
    mesh_sizes(parallel, world_size)
    check_tensor_parallel(model, parallel.tp)
    _check(
        model.n_experts % (parallel.ep * parallel.tp) == 0,
        f"model.n_experts ({model.n_experts}) must be divisible by parallel.ep ({parallel.ep}) x parallel.tp "
        f"({parallel.tp}): the tp ranks are folded into expert parallelism",
    )
    _check(
        not (parallel.compile and parallel.tp > 1 and parallel.activation_checkpoint == "full"),
        "parallel.activation_checkpoint = 'full' with parallel.compile and parallel.tp > 1 fails in torch 2.13's "
        "AOTAutograd (a DeviceMesh among the saved tensors; docs/design.md): use 'loop', or parallel.compile = false",
    )
    _check(
        train.steps >= 0 and train.seq_len > 0 and train.micro_batch_size > 0 and train.grad_accum_steps > 0,
        "train.steps, seq_len, micro_batch_size, grad_accum_steps must be positive",
    )
    _check(
        train.seq_len % parallel.tp == 0,
        f"train.seq_len ({train.seq_len}) must be divisible by parallel.tp ({parallel.tp}): sequence parallelism",
    )
    _check(
        train.seq_len <= model.max_seq_len,
        f"train.seq_len ({train.seq_len}) must be <= model.max_seq_len ({model.max_seq_len})",
    )
    _check(
        1 <= train.min_depth <= train.max_depth,
        f"train.min_depth ({train.min_depth}) must be in [1, train.max_depth ({train.max_depth})]",
    )
    _check(
        train.min_depth <= train.mean_depth <= train.max_depth,
        f"train.mean_depth ({train.mean_depth}) must lie in [train.min_depth, train.max_depth] = [{train.min_depth}, {train.max_depth}]",
    )
    _check(
        1 <= train.backprop_depth <= train.max_depth,
        f"train.backprop_depth ({train.backprop_depth}) must be in [1, train.max_depth ({train.max_depth})]",
    )
    _check(train.depth_warmup_steps >= 0, f"train.depth_warmup_steps ({train.depth_warmup_steps}) must be >= 0")
    if train.depth_distribution == "fixed":
        _check(
            float(train.mean_depth).is_integer(),
            f"train.mean_depth ({train.mean_depth}) must be a whole number with depth_distribution = 'fixed'",
        )
    _check(train.max_skipped_steps >= 1, "train.max_skipped_steps must be >= 1")
    catchable = {"SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2", "SIGHUP", "SIGQUIT"}
    for name in train.stop_signals:
        _check(name in catchable, f"train.stop_signals: {name!r} is not one of {sorted(catchable)}")
    _check(
        not train.document_masking or cfg.data.return_doc_boundaries,
        "train.document_masking needs data.return_doc_boundaries = true (the batches' doc_starts)",
    )

    optim = cfg.optim
    _check(optim.lr > 0 and 0 <= optim.min_lr_ratio <= 1, "optim.lr must be > 0 and optim.min_lr_ratio in [0, 1]")
    _check(0 <= optim.warmup_steps, "optim.warmup_steps must be >= 0")
    _check(0 < optim.wsd_decay_fraction <= 1, "optim.wsd_decay_fraction must be in (0, 1]")
    _check(
        cfg.checkpoint.every_steps > 0 and cfg.checkpoint.keep_last >= 1,
        "checkpoint.every_steps and checkpoint.keep_last must be >= 1",
    )
    _check(cfg.checkpoint.load_step >= -1, f"checkpoint.load_step ({cfg.checkpoint.load_step}) must be >= 0, or -1")
    _check(all(n >= 1 for n in cfg.eval.loop_counts), "eval.loop_counts must all be >= 1")
    canary = cfg.canary
    _check(
        min(canary.programs, canary.train_hops, canary.eval_programs, canary.queries) >= 1
        and canary.distractor_chains >= 0,
        "canary.programs, canary.train_hops, canary.eval_programs and canary.queries must be >= 1, "
        "canary.distractor_chains >= 0",
    )
    longest = (2 + canary.distractor_chains) * canary.train_hops  # variables of a 2 * train_hops evaluation program
    _check(
        longest <= canary.variables <= 26,
        f"canary.variables ({canary.variables}) must be <= 26 letters and >= (2 + distractor_chains) * train_hops "
        f"= {longest}, the variables of the longest evaluation program",
    )
    profile = cfg.profile
    _check(
        min(profile.wait, profile.warmup, profile.repeat) >= 0 and profile.active >= 1,
        "profile.wait/warmup/repeat must be >= 0 and profile.active >= 1",
    )
    cfg.data.validate()
