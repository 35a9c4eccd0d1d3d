"""The depth canary: chained assignments whose answer needs exactly d hops, written as ordinary text documents.

A program is one line of Python, interleaved chains of single-letter variables, each chain starting at a digit:

    pass;q=4;k=q;x=7;m=k;print(m)#>4

Every statement (`k=q`, `q=4`) and query (`print(m)`) is one tokenizer piece (data.user_symbols), so one hop is
one attention lookup: with `k = q` written as three pieces the model first has to learn to carry each statement's
name to its value (an induction head), and no model here left the "one of the program's digits" plateau in the
steps available (docs/science.md).

The queried chain has exactly `hops` assignments (1 = copy the digit); the distractor chains have 1..train_hops.
Every variable is assigned once, so no shorter path to the answer exists. Everything up to the answer marker
`#>` is the prompt (a comment, so the whole line still runs), the digit after it the answer; data.loss_mask =
"answers" trains on the answer only. With canary.queries > 1 a training program asks more queries after the
first (`#>4;print(x)#>7`; data.answer_end = ";" ends each answer), each its own supervised answer. Train programs have d <= train_hops; evaluation programs cover d = 1 ..
2 * train_hops with a different seed, and any that also occur in the training text are dropped (disjoint).
"""

from __future__ import annotations

import json
import os
import random
import string
from dataclasses import asdict, dataclass
from pathlib import Path

from data_pipeline import DataError, prepare
from mythos_train.config import ConfigError, JobConfig

ANSWER_MARKER = "#>"
"Ends the prompt; prepare registers it as one tokenizer piece (data.answer_marker)."
PROGRAMS_FILE = "programs.parquet"
EVAL_FILE = "eval.jsonl"


@dataclass(frozen=True)
class Program:
    prompt: str
    "The program up to and including the answer marker."
    answer: str
    "What print() writes: the digit at the start of the queried chain."
    hops: int
    "Assignments on the path from the queried variable to the digit."
    more: str = ""
    "Further queries of the same program, each with its answer (training text only, canary.queries > 1)."

    @property
    def text(self) -> str:
        return self.prompt + self.answer + self.more


def make_program(
    rng: random.Random,
    hops: int,
    distractor_chains: int,
    max_distractor_hops: int,
    queries: int = 1,
    letters: str = string.ascii_lowercase,
) -> Program:
    """One program whose query needs exactly `hops` hops, among `distractor_chains` chains of 1..max hops, its
    variables drawn from `letters`; then up to queries - 1 more queries of distinct other variables (more answers
    per token of program)."""
    lengths = [hops] + [rng.randint(1, max_distractor_hops) for _ in range(distractor_chains)]
    if sum(lengths) > len(letters):
        raise ValueError(f"{sum(lengths)} variables do not fit in {len(letters)} letters")
    names = iter(rng.sample(letters, sum(lengths)))
    chains = [[next(names) for _ in range(n)] for n in lengths]
    values = [rng.randrange(10) for _ in chains]
    # A uniformly random interleaving that keeps each chain in order: draw a chain per remaining statement.
    order = [c for c, n in enumerate(lengths) for _ in range(n)]
    rng.shuffle(order)
    done = [0] * len(chains)
    statements = []
    for c in order:
        i, chain = done[c], chains[c]
        statements.append(f"{chain[0]}={values[c]}" if i == 0 else f"{chain[i]}={chain[i - 1]}")
        done[c] += 1
    prompt = ";".join(["pass", *statements]) + f";print({chains[0][-1]}){ANSWER_MARKER}"
    others = [(name, values[c]) for c, chain in enumerate(chains) for name in chain if name != chains[0][-1]]
    more = rng.sample(others, min(queries - 1, len(others)))
    more_text = "".join(f";print({name}){ANSWER_MARKER}{value}" for name, value in more)
    return Program(prompt, str(values[0]), hops, more_text)


def variable_letters(cfg: JobConfig) -> str:
    """The canary.variables letters programs name their variables with."""
    return string.ascii_lowercase[: cfg.canary.variables]


def statement_pieces(letters: str = string.ascii_lowercase) -> list[str]:
    """Every statement and query a program can hold, each registered as one tokenizer piece (data.user_symbols)."""
    return [f"{x}={y}" for x in letters for y in letters + string.digits if x != y] + [f"print({x})" for x in letters]


def training_programs(cfg: JobConfig) -> list[Program]:
    """`canary.programs` programs, hop counts uniform on 1..train_hops (so every batch keeps copying, d = 1)."""
    c, letters = cfg.canary, variable_letters(cfg)
    rng = random.Random(c.seed)
    return [
        make_program(rng, rng.randint(1, c.train_hops), c.distractor_chains, c.train_hops, c.queries, letters)
        for _ in range(c.programs)
    ]


def evaluation_programs(cfg: JobConfig, exclude: set[str]) -> list[Program]:
    """`canary.eval_programs` programs for each d = 1 .. 2 * train_hops, none of them in `exclude` (train texts)."""
    c, letters = cfg.canary, variable_letters(cfg)
    rng = random.Random(c.seed + 1_000_003)
    programs = []
    for hops in range(1, 2 * c.train_hops + 1):
        found: dict[str, Program] = {}
        for _ in range(1000 * c.eval_programs):
            p = make_program(rng, hops, c.distractor_chains, c.train_hops, letters=letters)
            if p.text not in exclude:
                found.setdefault(p.text, p)
            if len(found) == c.eval_programs:
                break
        else:
            raise ValueError(f"canary: fewer than {c.eval_programs} new programs with {hops} hops exist")
        programs.extend(found.values())
    return programs


def read_eval_programs(path: str) -> list[Program]:
    """The evaluation set written by `write_canary` (eval.jsonl)."""
    if not os.path.isfile(path):
        raise DataError(f"{path} does not exist: run `python -m mythos_train canary` with this config first")
    with open(path) as f:
        return [Program(**json.loads(line)) for line in f if line.strip()]


def write_canary(cfg: JobConfig) -> dict[str, str]:
    """Write the training text (one program per row of canary.dir/programs.parquet) and the evaluation set
    (canary.dir/eval.jsonl), then run prepare on the text. Returns the paths written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = cfg.canary.dir
    if Path(folder).resolve().is_relative_to(Path(cfg.data.prepared_dir).resolve()):
        raise ConfigError(
            f"canary.dir ({folder}) is inside data.prepared_dir ({cfg.data.prepared_dir}): prepare replaces that "
            "whole folder and refuses one holding files it did not write; write the canary text elsewhere"
        )
    os.makedirs(folder, exist_ok=True)
    train = training_programs(cfg)
    texts = [p.text for p in train]
    evaluation = evaluation_programs(cfg, set(texts))
    text_path, eval_path = os.path.join(folder, PROGRAMS_FILE), os.path.join(folder, EVAL_FILE)
    pq.write_table(pa.table({cfg.data.text_column: texts}), text_path + ".tmp", row_group_size=16384)
    os.replace(text_path + ".tmp", text_path)
    with open(eval_path + ".tmp", "w") as f:
        f.writelines(json.dumps(asdict(p)) + "\n" for p in evaluation)
    os.replace(eval_path + ".tmp", eval_path)
    cfg.data.sources, cfg.data.user_symbols = [text_path], statement_pieces(variable_letters(cfg))
    summary = prepare(cfg.data)
    return {"text": text_path, "eval": eval_path, "prepared": summary["prepared_dir"]}
