"""Property-based tests (hypothesis): the budget parser, the ε parser, the store's id handling; and a fuzz
run of ``lance`` argument vectors (in process, plus a few real subprocesses): every exit is 0, 1 or 2 and
no traceback is printed."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.calibration.budget import MAX_BUDGET_BYTES, UNIT_BYTES, BudgetError, parse_budget
from engine.cli import main
from engine.store import RunStore, StoreError
from engine.store.ids import BadRunId, check_prefix, is_run_id, run_folder
from engine.train.config import ConfigError, FinetuneConfig, per_method, validate

REPO_ROOT = Path(__file__).resolve().parents[1]
UNITS = [u for u in UNIT_BYTES if u] + ["B", "KB", "MB", "GB", "KiB", "MiB", "GiB", "kB"]


# ---------------------------------------------------------------------- budget parser
@given(st.floats(min_value=0, max_value=1e12, allow_nan=False), st.sampled_from(UNITS), st.booleans())
def test_budget_parses_to_whole_bytes_never_above_the_amount(number, unit, space):
    text = f"{number!r}{' ' if space else ''}{unit}"
    exact = number * UNIT_BYTES[unit.lower()]
    if exact > MAX_BUDGET_BYTES:
        with pytest.raises(BudgetError):
            parse_budget(text)
        return
    n_bytes = parse_budget(text)
    assert isinstance(n_bytes, int) and n_bytes >= 0
    assert n_bytes <= exact * (1 + 1e-12) + 1e-6  # a ceiling is never raised by rounding
    assert n_bytes > exact * (1 - 1e-9) - 1.000001


@given(st.text(max_size=30))
def test_budget_parser_takes_any_text_and_only_raises_budget_error(text):
    try:
        n_bytes = parse_budget(text)
    except BudgetError as exc:
        assert str(exc)  # the message says what to write
        return
    assert isinstance(n_bytes, int) and 0 <= n_bytes <= MAX_BUDGET_BYTES


@given(st.floats(allow_nan=True, allow_infinity=True) | st.integers(min_value=-10**30, max_value=10**30))
def test_budget_numbers_are_finite_nonnegative_or_refused(value):
    try:
        n_bytes = parse_budget(value)
    except BudgetError:
        assert not (isinstance(value, (int, float)) and math.isfinite(value) and 0 <= value <= MAX_BUDGET_BYTES)
        return
    assert 0 <= n_bytes <= MAX_BUDGET_BYTES and n_bytes <= value


# ---------------------------------------------------------------------- eps parser
EPS_TEXT = st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr), st.text(max_size=12),
                     st.sampled_from(["0", "1", "0.5", "1.0000001", "-0.1", "1e-9", "nan", "inf", ".7", "0x1"]))


@given(EPS_TEXT)
@settings(suppress_health_check=[HealthCheck.too_slow], max_examples=150)
def test_eps_is_accepted_exactly_when_it_is_in_0_1(text):
    try:
        eps = per_method(text, ["hosvd"], ("hosvd", "lance"), "--eps")
        config = FinetuneConfig(backbone="small-cnn", dataset="digits", methods=["hosvd"], eps=eps)
        validate(config, check_data=False)
    except ConfigError as exc:
        assert str(exc)
        try:
            value = float(text.strip())
        except ValueError:
            return
        assert not (0 < value <= 1) or "=" in text or "," in text
        return
    value = config.eps.get("hosvd")
    assert value is None or (0 < value <= 1 and value == float(text.strip()))


@given(st.dictionaries(st.sampled_from(["hosvd", "lance"]), st.floats(min_value=1e-6, max_value=1.0), min_size=1))
def test_per_method_eps_round_trips(values):
    text = ",".join(f"{m}={v!r}" for m, v in values.items())
    parsed = per_method(text, ["hosvd", "lance"], ("hosvd", "lance"), "--eps")
    assert {m: float(v) for m, v in parsed.items()} == values


# ---------------------------------------------------------------------- store ids
ID_CHARS = st.text(alphabet="0123456789abcdef-./\\%_*?~ \x00é", max_size=30)


@given(ID_CHARS)
def test_only_well_formed_ids_become_paths_and_they_stay_inside_runs(tmp_path_factory, text):
    runs_root = Path("/tmp/store-root/runs")
    if is_run_id(text):
        folder = run_folder(runs_root, text)
        assert folder.parent == runs_root and folder.name == text
    else:
        with pytest.raises(BadRunId):
            run_folder(runs_root, text)


@given(ID_CHARS)
def test_prefixes_are_nonempty_and_made_of_id_characters(text):
    try:
        prefix = check_prefix(text)
    except BadRunId:
        assert not text.strip() or any(c not in "0123456789abcdef-" for c in text.strip()) or len(text.strip()) > 22
        return
    assert prefix and set(prefix) <= set("0123456789abcdef-")


@pytest.fixture(scope="module")
def id_store(tmp_path_factory):
    store = RunStore(tmp_path_factory.mktemp("ids"))
    ids = [store.create_run("finetune", "vanilla", {}) for _ in range(3)]
    return store, ids


@given(ID_CHARS)
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=150)
def test_find_and_delete_never_touch_a_run_they_were_not_given(id_store, text):
    store, ids = id_store
    try:
        run = store.find_run(text)
    except StoreError:
        pass
    else:
        matching = [i for i in ids if i.startswith(text.strip())]
        assert matching == [run["id"]]  # exactly one match, or an error: never "every run"
    with pytest.raises(StoreError):
        store.delete_run(text) if text not in ids else (_ for _ in ()).throw(StoreError("skip a real id"))
    assert all(store.run_dir(i).is_dir() for i in ids) and len(store.list_runs()) == 3


# ---------------------------------------------------------------------- fuzzing the CLI
COMMANDS = [["runs", "list"], ["runs", "show"], ["runs", "export"], ["runs", "delete"], ["runs", "repair"],
            ["finetune"], ["evaluate"], ["continual"], ["data"], ["ranks"], ["calibrate"], []]
VALUES = st.sampled_from(["", " ", "-1", "0", "1", "1e300GB", "nan", "inf", "0.5MB", "-", "--", "..", "../../x",
                          "%", "a=b", "asi=0.1,lance", "hosvd=2", "digits", "small-cnn", "imagefolder:/nope",
                          "999", "x" * 300, "\x7f", "é"])
FLAGS = st.sampled_from(["--budget", "--eps", "--patch", "--ranks", "--method", "--epochs", "--layers", "--lr",
                         "--backbone", "--dataset", "--out", "--format", "--resume", "--run", "--json", "--force",
                         "--benchmark", "--limit-train", "--batch-size", "--kind", "--status", "--seed",
                         "--weights", "--split"])
ARGV = st.tuples(st.sampled_from(COMMANDS), st.lists(st.one_of(FLAGS, VALUES), max_size=6)).map(
    lambda t: [*t[0], *t[1]])


def _fast_enough(argv: list[str]) -> bool:
    """Vectors that could start real training are left to the dedicated tests (the fuzz stays short)."""
    if argv[:1] in (["finetune"], ["continual"], ["calibrate"], ["ranks"], ["evaluate"]):
        return not ({"small-cnn", "digits"} <= set(argv) or "split-digits" in argv)
    return True


@given(ARGV)
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_fuzzed_argument_vectors_exit_0_1_or_2_without_traceback(capfd, argv):
    if not _fast_enough(argv):
        return
    os.environ.pop("LANCE_DEBUG", None)
    code = main(argv)
    out, err = capfd.readouterr()
    assert code in (0, 1, 2), (argv, code, err[-2000:])
    assert "Traceback" not in out + err, (argv, err[-2000:])
    assert "internal error" not in err, (argv, err[-2000:])


@pytest.mark.parametrize("argv", [
    ["runs", "show", ""], ["runs", "delete", ""], ["finetune", "--budget", "1e300GB", "--backbone", "small-cnn",
                                                   "--dataset", "digits", "--method", "asi"],
    ["runs", "export", "x", "--out", "/dev/null/x.json"], ["continual", "--benchmark", "nope"], ["nonsense"],
])
def test_real_lance_processes_exit_0_1_or_2_without_traceback(argv):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    env.pop("LANCE_DEBUG", None)
    done = subprocess.run([sys.executable, "-m", "engine", *argv], check=False, capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode in (0, 1, 2), (argv, done.returncode, done.stderr[-2000:])
    assert "Traceback" not in done.stdout + done.stderr, done.stderr[-2000:]
