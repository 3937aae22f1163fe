"""Every command, walked through its user mistakes: one line on stderr, exit status 2, no
traceback. A new command fails `test_every_command_is_walked` until its mistakes are listed."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from simfluence.cli.main import build_parser, main

pytest.importorskip("torch")
pytest.importorskip("sklearn")


def _argv(text: str) -> list[str]:
    return text.split()


SYNTH = _argv("--pool 30 --tests 5 --runs 6 --per-run 12 --batch 4 --epochs 1 --seed 3")
DIGITS = _argv("--runs 3 --pool 20 --per-run 8 --tests 5 --batch 4 --epochs 1 --no-progress")


def commands() -> set[str]:
    """The commands `simfluence --help` lists."""
    parser = build_parser()
    (sub,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return set(sub.choices)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A synthetic run set, a simulator fitted on it, a digits recording without checkpoints,
    a curriculum with an unknown id, a file without a task."""
    root = tmp_path_factory.mktemp("mistakes")
    synth, model, digits = root / "synth", root / "linear.npz", root / "digits"
    assert main(["synth", str(synth), *SYNTH]) == 0
    assert main(["fit", str(synth), "--method", "linear", "--l2", "1", "-o", str(model)]) == 0
    assert main(["record", str(digits), *DIGITS, "--checkpoints", "none"]) == 0
    (root / "curriculum.json").write_text(json.dumps([["train-1"], ["no-such-id"]]))
    (root / "plain.py").write_text("class Model:\n    pass\n")
    return {
        "synth": str(synth),
        "model": str(model),
        "digits": str(digits),
        "curriculum": str(root / "curriculum.json"),
        "plain": str(root / "plain.py"),
        "root": str(root),
    }


# command -> [(arguments after the command, a piece of the expected message)]
CASES: dict[str, list[tuple[str, str]]] = {
    "synth": [
        ("{root}/s --pool 0", "must be at least 1"),
        ("{root}/s --per-run 50 --pool 30", "per"),
    ],
    "fit": [
        ("{synth} --method nope -o {root}/m.npz", "unknown method 'nope'"),
        ("{root}/missing --method linear -o {root}/m.npz", "no such run-set directory"),
        ("{synth} --method tracin-cp -o {root}/m.npz", "not recorded by `simfluence record`"),
        ("{digits} --method grad-dot -o {root}/m.npz", "no saved checkpoints"),
        ("{synth} --method linear", "-o/--output"),
        (
            "{digits} --method featurized --loss-power 1 -o {root}/m.npz",
            "method 'featurized' does not take --loss-power; its options: --l2, --unseen",
        ),
    ],
    "simulate": [
        ("{root}/none.npz --curriculum x -o {root}/p.json", "no such simulator file"),
        ("{model} --curriculum {curriculum} -o {root}/p.json", "unknown training id 'no-such-id'"),
        ("{model} -o {root}/p.json", "either --curriculum FILE or --runs DIR --run RUN_ID"),
        ("{model} --features {root}/f.npz --curriculum x -o {root}/p.json", "cannot take new"),
        ("{model} --runs {synth} --run run-9999 -o {root}/p.json", "run-9999"),
    ],
    "evaluate": [
        ("{root}/missing", "no such run-set directory"),
        ("{synth} --methods linear,nope", "unknown method 'nope'"),
        ("{synth} --holdout 6", "--holdout 6: must be between 1 and 5"),
        ("{digits} --methods linear,tracin-cp --holdout 1", "tracin-cp: run 'run-0000' has no"),
        ("{digits} --methods tracin-cp --task nope:Task", "no module named 'nope'"),
        ("{root}", "manifest.json: missing (not a simfluence run set?)"),
        ("{synth} --methods hybrid --loss-power 1", "method 'hybrid' does not take --loss-power"),
    ],
    "import-gptfluence": [("{root}/missing {root}/out", "missing")],
    "export-gptfluence": [("{root}/missing {root}/out", "no such run-set directory")],
    "record": [
        ("{root}/r --task nope", "unknown task 'nope'"),
        ("{root}/r --task {root}/absent.py:Task", "no such file"),
        ("{root}/r --task {plain}:Model", "is not a subclass of simfluence.recording.Task"),
        ("{root}/r --task no_such_package_xyz:Task", "no module named 'no_such_package_xyz'"),
        ("{root}/r --task-kwargs [1]", "--task-kwargs '[1]': expected a JSON object"),
        ('{root}/r --task-kwargs {{"width":1}}', "cannot be built with {'width': 1}"),
        ("{root}/r --checkpoints 0,x", "'x' is not a step number"),
        ("{digits} --lr 0.5", "holds a recording with a different config (lr: 0.1 there"),
        ("{synth}", "holds a run set that was not recorded by `simfluence record`"),
        ("{root}/r --runs 0", "must be at least 1"),
    ],
    "features": [
        ("{root}/missing", "no such run-set directory"),
        ("{synth}", "was not recorded by `simfluence record`"),
        ("{digits} --kind sideways", "has no feature kind 'sideways'"),
        ("{digits} --task newsgroups-minilm", "is task 'newsgroups-minilm', but"),
        ("{digits} --task nope:Task", "no module named 'nope'"),
        ("{synth} --from {root}/none.npz", "no such feature file"),
        ("{synth} --from {curriculum}", "feature files must be .npz or .parquet"),
    ],
    "demo": [("--task nope --out {root}/d", "unknown task 'nope'")],
    "validate": [
        ("{digits} --kinds random,sideways --methods linear", "unknown kind 'sideways'"),
        ("{digits} --methods linear,nope", "unknown method 'nope'"),
        ("{synth} --methods linear", "was not recorded by `simfluence record`"),
        ("{digits} --task newsgroups-minilm", "is task 'newsgroups-minilm', but"),
        ("{digits} --curricula 1 --methods linear", "--curricula must be at least 2"),
        ("{digits} --methods grad-dot --kinds random", "no saved checkpoints"),
    ],
    "attribute": [
        ("{root}/none.npz --test t --curriculum x", "no such simulator file"),
        ("{model} --test nope --curriculum {curriculum}", "nope"),
    ],
    "optimize": [
        ("{root}/none.npz --size 4 -o {root}/o.json", "no such simulator file"),
        ("{model} --size 999 -o {root}/o.json", "size 999"),
        ("{model} --size 4 --objective ids -o {root}/o.json", "--objective ids needs"),
    ],
    "report": [
        ("{synth} --methods nope -o {root}/r.html", "unknown method 'nope'"),
        ("{synth} --validation {root}/none.json -o {root}/r.html", "no such file"),
        ("{synth} --methods tracin-cp -o {root}/r.html", "not recorded by `simfluence record`"),
    ],
}


def test_every_command_is_walked() -> None:
    assert set(CASES) == commands()


@pytest.mark.parametrize(
    ("command", "arguments", "message"),
    [(c, a, m) for c, cases in CASES.items() for a, m in cases],
)
def test_user_mistake_is_one_line_and_status_2(
    files: dict[str, str],
    command: str,
    arguments: str,
    message: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = [command, *arguments.format(**files).split()]
    capsys.readouterr()
    status = main(argv)
    err = capsys.readouterr().err
    assert status == 2, err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"simfluence {command}: error: "), err
    assert message in err, err
    assert "Traceback" not in err


def test_evaluate_keeps_the_methods_that_worked(
    files: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "eval.json"
    argv = ["evaluate", files["digits"], "--methods", "linear,tracin-cp,mean", "--holdout", "1"]
    assert main([*argv, "--json", str(out)]) == 2
    captured = capsys.readouterr()
    result = json.loads(out.read_text())
    assert set(result["methods"]) == {"linear", "mean"}
    assert "no saved checkpoints" in result["failed"]["tracin-cp"]
    assert "tracin-cp" in captured.out and "failed" in captured.out  # the table says so too
    assert "1 of 3 methods failed (tracin-cp)" in captured.err


def _run_without(module: str, argv: list[str]) -> subprocess.CompletedProcess[str]:
    """The command line in a fresh process in which `module` cannot be imported (as if the
    optional extra that provides it were not installed)."""
    code = f"""
import importlib.abc, sys
class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == {module!r} or name.startswith({module!r} + "."):
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, NotInstalled())
from simfluence.cli.main import main
sys.exit(main(sys.argv[1:]))
"""
    return subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, check=False
    )


@pytest.mark.parametrize(
    ("command", "arguments"),
    [
        ("record", "{root}/t --runs 2"),
        ("evaluate", "{digits} --methods linear,tracin-cp --holdout 1"),
    ],
)
def test_a_missing_optional_extra_is_one_line(
    files: dict[str, str], command: str, arguments: str
) -> None:
    done = _run_without("torch", [command, *arguments.format(**files).split()])
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    (line,) = done.stderr.strip().splitlines()[-1:]
    assert line.startswith(f"simfluence {command}: error: ") and "'torch'" in line
    assert "pip install 'simfluence[record]'" in line
