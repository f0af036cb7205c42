"""Property-based tests: random and malformed values for every config field, flag and TOML file
always end in success or one clear error line with a non-zero status; never a traceback, never
an MLflow store (validation happens before any run starts)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fedcl.cli import main
from fedcl.config import FIELDS, PARAM_TABLES, config_from_dict
from fedcl.errors import FedclError
from fedcl.run_setup import setup_run

values = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-10**12, max_value=10**12),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=8), st.one_of(st.integers(), st.text(max_size=5)),
                    max_size=2),
)
FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(name=st.sampled_from(sorted(FIELDS)), value=values)
@example(name="client_fault_mode", value="\n")  # a choice echoed in its error message
@example(name="scenario", value="a\u2028b")
def test_any_value_for_any_field_is_accepted_or_a_config_error(name: str, value: object) -> None:
    try:
        setup_run(config_from_dict({name: value}, source="fuzz"))
    except FedclError as err:
        assert str(err) and str(err).isprintable()  # one line, nothing a terminal acts on


@FUZZ
@given(key=st.text(min_size=1, max_size=20), value=values)
def test_unknown_keys_are_refused(key: str, value: object) -> None:
    if key in FIELDS:
        return
    with pytest.raises(FedclError, match="unknown config key"):
        config_from_dict({key: value})


flag_names = st.sampled_from(
    ["--" + name.replace("_", "-") for name in FIELDS if name not in PARAM_TABLES]
    + ["--strategy-param", "--unlearning-param", "--config", "--bogus", "--no-download",
       "--download"])
flag_values = st.one_of(st.text(max_size=12), st.integers().map(str),
                        st.floats(allow_nan=True).map(str),
                        st.sampled_from(["0", "-1", "1e309", "nan", "none", "k=v", "=", ""]))


def _check_one_line(code: int, err: str) -> None:
    assert "Traceback" not in err
    if code != 0:
        lines = err.strip().splitlines()
        assert len(lines) == 1, err
        assert lines[0].startswith("fedcl: error: ")


@FUZZ
@given(args=st.lists(st.tuples(flag_names, flag_values), min_size=1, max_size=4))
def test_random_flags_give_one_line_or_success(args: list[tuple[str, str]],
                                               capsys: pytest.CaptureFixture[str],
                                               tmp_path: Path) -> None:
    argv = ["config"]
    for flag, value in args:
        argv += [flag] if flag in ("--no-download", "--download") else [flag, value]
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        code = main(argv)
    finally:
        os.chdir(cwd)
    captured = capsys.readouterr()
    _check_one_line(code, captured.err)
    assert not (tmp_path / "mlflow.db").exists()


@FUZZ
@given(text=st.one_of(
    st.text(max_size=200),
    st.lists(st.tuples(st.sampled_from([*sorted(FIELDS), "nope"]),
                       st.sampled_from(["1", "-5", "0.5", "true", '"x"', "nan", "inf", "[1]",
                                       "{a=1}", '"class-il"', "1e999", "= ="])),
             max_size=5).map(lambda kv: "\n".join(f"{k} = {v}" for k, v in kv))))
def test_random_toml_files_give_one_line_or_success(text: str,
                                                    capsys: pytest.CaptureFixture[str],
                                                    tmp_path: Path) -> None:
    path = tmp_path / "fuzz.toml"
    path.write_text(text, encoding="utf-8")
    code = main(["config", "--config", str(path)])
    _check_one_line(code, capsys.readouterr().err)
