"""The depth canary's programs: the hop count is exact and every answer is what Python prints for the program."""

from __future__ import annotations

import contextlib
import io
import json
import random
import re

import pytest
from canary_testing import CANARY_TOML, prepare_canary

from data_pipeline import DataError
from mythos_train.canary import (
    ANSWER_MARKER,
    evaluation_programs,
    make_program,
    read_eval_programs,
    statement_pieces,
    training_programs,
    variable_letters,
    write_canary,
)
from mythos_train.config import ConfigError, load_config, validate


def _run(program: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(program, {})  # the answer marker starts a comment: the whole document is the program
    return out.getvalue().strip()


def _hops(program: str) -> int:
    """Independent hop count: parse the assignments, walk from the printed name to the digit, and check that
    every name is assigned once (so no shorter path exists)."""
    statements = [s.strip() for s in program.split(ANSWER_MARKER)[0].split(";")]
    assigned: dict[str, str] = {}
    for s in statements:
        if "=" in s:
            name, value = (x.strip() for x in s.split("="))
            assert name not in assigned, f"{name} assigned twice in {program!r}"
            assigned[name] = value
    name, hops = statements[-1].removeprefix("print(").removesuffix(")").strip(), 0
    while not name.isdigit():
        name, hops = assigned[name], hops + 1
    return hops


@pytest.mark.parametrize("hops", range(1, 9))
def test_hop_count_is_exact_and_the_answer_is_what_python_prints(hops):
    rng = random.Random(hops)
    for _ in range(50):
        program = make_program(rng, hops, distractor_chains=2, max_distractor_hops=4)
        assert program.hops == hops == _hops(program.prompt)
        assert _run(program.text) == program.answer
        assert program.prompt.endswith(ANSWER_MARKER) and program.answer.isdigit()


def test_every_query_of_a_multi_query_program_is_answered_as_python_prints():
    """canary.queries > 1: after the first (exact-d) query come more, each answer checked by running the program's
    assignments followed by that print."""
    rng = random.Random(7)
    for _ in range(100):
        program = make_program(rng, 3, distractor_chains=2, max_distractor_hops=4, queries=5)
        assignments = program.text.split(";print")[0]
        queries = re.findall(r"print\((\w)\)#>(\d)", program.text)
        assert len(queries) == 5 and program.text.count(ANSWER_MARKER) == 5 and _hops(program.prompt) == 3
        assert len({name for name, _ in queries}) == 5
        assert queries[0][1] == program.answer and program.text.startswith(program.prompt + program.answer + ";")
        for name, answer in queries:
            assert _run(f"{assignments};print({name})") == answer


def test_canary_command_writes_disjoint_splits_and_prepares_them(tmp_path):
    cfg = prepare_canary(tmp_path)
    import pyarrow.parquet as pq

    train = set(pq.read_table(tmp_path / "text" / "programs.parquet").column("text").to_pylist())
    evaluation = read_eval_programs(str(tmp_path / "text" / "eval.jsonl"))
    assert len(train) > 2900  # a few random programs repeat; that is fine within the training text
    assert sorted({p.hops for p in evaluation}) == list(range(1, 2 * cfg.canary.train_hops + 1))
    assert all(p.text not in train for p in evaluation)
    assert all(_hops(p.prompt) == p.hops and _run(p.text) == p.answer for p in evaluation)
    assert json.loads((tmp_path / "prepared" / "manifest.json").read_text())["documents"]["train"] > 2500
    assert evaluation_programs(cfg, train) == evaluation  # the evaluation set is reproducible from the config


def test_missing_evaluation_set_names_the_file_and_the_command(tmp_path):
    with pytest.raises(DataError, match=r"eval\.jsonl does not exist: run `python -m mythos_train canary`"):
        read_eval_programs(str(tmp_path / "eval.jsonl"))


def test_too_many_variables_is_a_config_error():
    cfg = load_config(CANARY_TOML, ["--canary.train_hops=6", "--canary.distractor_chains=3"])
    with pytest.raises(ConfigError, match="26 letters"):
        validate(cfg, 1)
    cfg = load_config(CANARY_TOML, ["--canary.variables=15"])  # 4 hops, 2 distractors: 16 variables at d = 8
    with pytest.raises(
        ConfigError, match=r"canary.variables \(15\) .* >= \(2 \+ distractor_chains\) \* train_hops = 16"
    ):
        validate(cfg, 1)


def test_fewer_variables_use_only_the_first_letters_and_register_their_pieces():
    cfg = load_config(CANARY_TOML, ["--canary.variables=16", "--canary.programs=300", "--canary.eval_programs=8"])
    validate(cfg, 1)
    letters = set(variable_letters(cfg))
    assert letters == set("abcdefghijklmnop")
    pieces = set(statement_pieces(variable_letters(cfg)))
    assert len(pieces) == 16 * (16 + 9) + 16  # x=y and x=digit statements, print(x) queries
    for program in training_programs(cfg) + evaluation_programs(cfg, set()):
        statements = program.text.removeprefix("pass;").replace(ANSWER_MARKER, ";").split(";")
        assert all(s in pieces for s in statements if not s.isdigit()), program.text
        assert set(re.findall(r"[a-z]", program.text.replace("print", "").replace("pass", ""))) <= letters


def test_canary_text_inside_the_prepared_folder_is_a_config_error(tmp_path, monkeypatch):
    """The canary command refuses before writing anything; other commands never write canary.dir, so a training
    config with data.prepared_dir = "data" still validates."""
    monkeypatch.chdir(tmp_path)
    cfg = load_config(CANARY_TOML, ["--canary.dir=data/canary/text", "--data.prepared_dir=data/canary"])
    validate(cfg, 1)
    with pytest.raises(
        ConfigError, match=r"canary.dir \(data/canary/text\) is inside data.prepared_dir \(data/canary\)"
    ):
        write_canary(cfg)
    assert not (tmp_path / "data").exists()
