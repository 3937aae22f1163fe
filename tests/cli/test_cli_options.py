"""The simulator options of the command line: one group, one builder, no option dropped without a
word; the default method lists' one home; example features computed where a method needs them."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from simfluence.cli._options import SIMULATOR_FLAGS, build_simulators
from simfluence.cli.main import build_parser, main
from simfluence.errors import SimfluenceError
from simfluence.runlog.runs import default_holdout
from simfluence.simulators import configure_simulator, simulator_params
from simfluence.simulators.methods import (
    DEFAULT_EVALUATE_METHODS,
    DEFAULT_VALIDATE_METHODS,
    DEMO_METHODS,
)

SYNTH = str.split("--pool 30 --tests 5 --runs 6 --per-run 12 --batch 4 --epochs 1 --seed 3")
DIGITS = str.split("--runs 6 --pool 20 --per-run 8 --tests 5 --batch 4 --epochs 1 --no-progress")


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> str:
    directory = tmp_path_factory.mktemp("options") / "synth"
    assert main(["synth", str(directory), *SYNTH]) == 0
    return str(directory)


# -- the library ------------------------------------------------------------------------------
def test_configure_simulator_raises_naming_the_method_the_invalid_and_the_valid_parameters() -> (
    None
):
    with pytest.raises(SimfluenceError) as caught:
        configure_simulator("hybrid", loss_power=1.0, cv_tests=10)
    message = str(caught.value)
    assert "'cv_tests', 'loss_power'" in message and "method 'hybrid'" in message
    assert "valid parameters are: l2, l2_grid, n_components" in message
    with pytest.raises(
        SimfluenceError, match=r"parameter 'unseen' for method 'mean'; valid .*none"
    ):
        configure_simulator("mean", unseen="prior")


def test_configure_simulator_defaults_reach_only_the_methods_that_take_them() -> None:
    mean = configure_simulator("mean", defaults={"unseen": "prior", "path": "x"})
    assert mean.get_params() == {}
    linear = configure_simulator("linear", defaults={"unseen": "prior", "l2": 3.0}, l2=1.0)
    assert (linear.unseen, linear.l2) == ("prior", 1.0)  # the options win over the defaults
    assert configure_simulator("linear", l2=None).l2 is None  # None: the method's default


# -- the command line -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("argv", "method", "flag", "options"),
    [
        (
            "evaluate {d} --methods hybrid --loss-power 1",
            "hybrid",
            "--loss-power",
            "--l2, --unseen",
        ),
        ("evaluate {d} --methods linear,hybrid --cv-tests 3", "hybrid", "--cv-tests", "--l2, "),
        ("fit {d} --method hybrid --shards 2 -o {d}/m.npz", "hybrid", "--shards", "--l2, --unseen"),
        ("fit {d} --method mean --l2 1 -o {d}/m.npz", "mean", "--l2", "none"),
        ("report {d} --methods linear,truth --l2 1 -o {d}/r.html", "truth", "--l2", "--unseen"),
        ("validate {d} --methods additive --loss-power 1", "additive", "--loss-power", "--l2, "),
        ("evaluate {d} --methods mean --l2 1", "mean", "--l2", "none"),  # alone: not exempt
    ],
)
def test_an_option_the_method_does_not_take_is_one_line_and_status_2(
    synth: str,
    capsys: pytest.CaptureFixture[str],
    argv: str,
    method: str,
    flag: str,
    options: str,
) -> None:
    assert main(argv.format(d=synth).split()) == 2
    captured = capsys.readouterr()
    command = argv.split()[0]
    line = f"simfluence {command}: error: method {method!r} does not take {flag}; its options: "
    assert captured.err.startswith(line + options) and captured.err.count("\n") == 1
    assert not list(Path(synth).glob("m.npz")) and not list(Path(synth).glob("r.html"))


def test_options_reach_the_methods_that_take_them_and_baselines_are_exempt(synth: str) -> None:
    argv = ["evaluate", synth, "--methods", "linear,additive,mean,truth,persistence"]
    args = build_parser().parse_args([*argv, "--unseen", "error", "--workers", "2"])
    simulators = build_simulators(args, args.methods, path=f"{synth}/truth.npz")
    assert simulators["linear"].unseen == simulators["truth"].unseen == "error"
    assert simulators["additive"].backend == "process:2"
    assert simulators["truth"].path == f"{synth}/truth.npz"
    args = build_parser().parse_args([*argv[:3], "linear,mean", "--l2", "2", "--loss-power", "1"])
    simulators = build_simulators(args, args.methods)
    assert (simulators["linear"].l2, simulators["linear"].loss_power) == (2.0, 1.0)
    assert simulators["linear"].unseen == "prior"  # evaluate's default, given by the command
    args = build_parser().parse_args(["fit", synth, "--method", "additive", "-o", "m.npz"])
    assert build_simulators(args, ["additive"])["additive"].unseen == "error"  # fit's default


def test_every_simulator_flag_sets_a_parameter_of_some_method() -> None:
    params = {p for name in ("linear", "hybrid", "truth") for p in simulator_params(name)}
    assert {param for _, param in SIMULATOR_FLAGS.values()} <= params


def test_default_method_lists_come_from_their_one_home() -> None:
    parser = build_parser()
    parsed = {
        "evaluate": parser.parse_args(["evaluate", "d"]).methods,
        "report": parser.parse_args(["report", "d", "-o", "r.html"]).methods,
        "validate": parser.parse_args(["validate", "d"]).methods,
        "demo": parser.parse_args(["demo"]).methods,
    }
    assert parsed["evaluate"] == parsed["report"] == list(DEFAULT_EVALUATE_METHODS)
    assert parsed["validate"] == list(DEFAULT_VALIDATE_METHODS)
    assert parsed["demo"] == list(DEMO_METHODS)
    assert [default_holdout(n) for n in (1, 6, 7, 32, 64)] == [1, 1, 1, 5, 10]


# -- example features -------------------------------------------------------------------------
def test_evaluate_computes_the_features_a_method_needs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "digits"
    assert main(["record", str(directory), *DIGITS, "--checkpoints", "none"]) == 0
    capsys.readouterr()
    argv = ["evaluate", str(directory), "--methods", "linear,hybrid", "--holdout", "1"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    features = directory / "features.npz"
    assert f"computing example features with the task's encoder (stored in {features})" in printed
    assert features.is_file() and "hybrid " in printed
    assert main(argv) == 0  # stored: not computed again
    assert "computing example features" not in capsys.readouterr().out


def test_a_run_set_without_a_task_leaves_the_method_to_say_what_to_do(
    synth: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bare = tmp_path / "bare"
    shutil.copytree(synth, bare)
    (bare / "features.npz").unlink()  # a synthetic set's own features, gone: no task to compute
    assert main(["fit", str(bare), "--method", "hybrid", "-o", str(tmp_path / "h.npz")]) == 2
    captured = capsys.readouterr()
    assert "computing example features" not in captured.out
    assert "the run set has no example features" in captured.err
    assert not (bare / "features.npz").exists()
