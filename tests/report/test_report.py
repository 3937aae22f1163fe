"""The HTML report: structure, self-containedness, the CLI, and rendering in headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
from conftest import missing_component

from simfluence import metrics
from simfluence.cli.main import main
from simfluence.errors import SimfluenceError
from simfluence.evaluation import (
    MetricSpec,
    evaluate,
    format_table,
    format_validation,
    read_validation,
    specs,
)
from simfluence.report import build_payload, render_report, write_report
from simfluence.runlog import save_runset
from simfluence.simulators import configure_simulator
from simfluence.synth import SynthConfig, generate

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
METHODS = ["linear", "mean", "persistence"]

ATTRIBUTION = {
    "description": "Simulated leave-one-out on test-0.",
    "test-0": {
        "sign_convention": "effect = L_T(with) - L_T(without); negative = helpful",
        "helpful": [{"train_id": "train-3", "count": 2, "effect": -0.0123}],
        "harmful": [{"train_id": "train-9", "count": 1, "effect": 0.0456}],
        "steps": {
            "change": [0.01 * np.sin(k) for k in range(20)],
            "top_steps": [
                {
                    "step": 4,
                    "change": -0.03,
                    "top_examples": [{"train_id": "train-1", "contribution": -0.02}],
                }
            ],
        },
        "pairs": [{"i": "train-3", "j": "train-9", "interaction": 0.001}],
    },
}
VALIDATION = {
    "kinds": {
        "random": {
            "methods": {
                "linear": {"all_steps_mse": 0.01, "final_step_spearman": 0.9, "lds": 0.7},
                "mean": {"all_steps_mse": 0.05, "final_step_spearman": 0.4, "lds": 0.1},
            }
        }
    },
    "optimized": {"predicted_final_loss": 1.2, "actual_final_loss": 1.25},
}


@pytest.fixture(scope="module")
def setup():
    runs, _ = generate(SynthConfig(pool=40, tests=6, runs=8, per_run=24, batch=4, epochs=2))
    sims = {name: configure_simulator(name, defaults={"unseen": "prior"}) for name in METHODS}
    return runs, evaluate(runs, sims, 2)


@pytest.fixture(scope="module")
def report(setup, tmp_path_factory) -> Path:
    runs, result = setup
    folder = tmp_path_factory.mktemp("report")
    figure = folder / "fig.png"
    fig, ax = plt.subplots(figsize=(2, 1))
    ax.plot([0, 1], [1, 0])
    fig.savefig(figure)
    plt.close(fig)
    return write_report(
        folder / "report.html",
        title="Test <report>",
        runs=runs,
        evaluation=result,
        attribution=ATTRIBUTION,
        validation=VALIDATION,
        figures={"a figure": figure},
        notes=["a note"],
    )


class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def _data(text: str) -> dict:
    match = re.search(
        r'<script type="application/json" id="simfluence-data">(.*?)</script>', text, re.S
    )
    assert match
    return json.loads(match.group(1))


def test_structure(report: Path, setup) -> None:
    runs, result = setup
    text = report.read_text()
    assert text.startswith("<!DOCTYPE html>")
    assert "Test &lt;report&gt;" in text  # escaped title
    for section in ("metrics", "viewer-section", "attribution-section", "validation-section"):
        assert f'id="{section}"' in text
    assert "curriculum-blind baseline" in text and "a note" in text
    assert "Simulated leave-one-out on test-0." in text  # the description is shown
    assert "train-9" in text and "Optimized curriculum" in text
    assert text.count('class="metrics') >= 2  # metrics + one validation kind
    assert "<table" in text and "data:image/png;base64," in text
    parser = _Collector()
    parser.feed(text)
    for tag, attrs in parser.tags:  # self-contained: nothing fetched from the network
        for key in ("src", "href"):
            value = attrs.get(key) or ""
            assert not value.startswith(("http:", "https:", "//")), (tag, value)
    assert not re.search(r"<link\b", text)
    data = _data(text)
    assert data["methods"] == METHODS and not data["trimmed"]
    run0 = runs.run(result.heldout_runs[0])
    r0 = data["runs"][0]
    j = r0["tests"][0]
    np.testing.assert_allclose(r0["recorded"][0], run0.losses[:, j], rtol=1e-4)
    sim = result.methods["linear"].simulated[0][:, j]
    np.testing.assert_allclose(r0["simulated"]["linear"][0], sim, rtol=1e-4)
    assert len(r0["tests"]) == len(runs.test_ids)
    best = re.findall(r'<td class="num best">', text)
    assert len(best) >= 4


def test_payload_is_trimmed_when_large(setup) -> None:
    runs, result = setup
    data = build_payload(runs, result, max_bytes=1000, max_tests=2)
    assert data["trimmed"]
    run = runs.run(result.heldout_runs[0])
    movement = np.abs(np.diff(run.losses, axis=0)).sum(axis=0)
    assert data["runs"][0]["tests"] == list(np.argsort(-movement)[:2])


def test_nonfinite_rollouts_become_null(setup) -> None:
    runs, result = setup
    result.methods["persistence"].simulated[0][3, 0] = np.inf
    try:
        data = build_payload(runs, result)
    finally:
        result.methods["persistence"].simulated[0][3, 0] = result.methods["persistence"].simulated[
            0
        ][2, 0]
    k = data["runs"][0]["tests"].index(0)
    assert data["runs"][0]["simulated"]["persistence"][k][3] is None


def test_cli(tmp_path: Path, capsys) -> None:
    runs, _ = generate(SynthConfig(pool=40, tests=6, runs=8, per_run=24, batch=4, epochs=2))
    save_runset(runs, tmp_path / "runs")
    (tmp_path / "val.json").write_text(json.dumps(VALIDATION))
    (tmp_path / "attr.json").write_text(json.dumps(ATTRIBUTION))
    fit = ["fit", str(tmp_path / "runs"), "--method", "mean", "--holdout", "2"]
    assert main([*fit, "-o", str(tmp_path / "m.npz")]) == 0
    out = tmp_path / "r.html"
    argv = ["report", str(tmp_path / "runs"), "--methods", "mean,persistence", "--holdout", "2"]
    argv += ["--model", str(tmp_path / "m.npz"), "--validation", str(tmp_path / "val.json")]
    argv += ["--attribution", str(tmp_path / "attr.json"), "-o", str(out)]
    assert main(argv) == 0
    text = out.read_text()
    data = _data(text)
    assert data["methods"] == ["mean", "persistence", "m (mean)"]
    assert "validation-section" in text and "data:image/png;base64," in text
    capsys.readouterr()
    bad = ["report", str(tmp_path / "runs"), "--validation", str(tmp_path / "no.json")]
    assert main([*bad, "-o", str(out)]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "runs"), "--methods", "nope", "-o", str(out)]) == 2


def test_metric_specs_drive_the_text_the_json_and_the_report(
    setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One table of metric specs: a spec added to it is computed (the JSON's keys), and shown
    in the text table and in the report's metric table and explanations."""
    runs, _ = setup

    def worst_step_error(true, simulated):
        errors = [np.abs(t - s).max() for t, s in zip(true, simulated, strict=True)]
        return metrics.Summary(float(np.mean(errors)), float(np.std(errors)))

    added = MetricSpec(
        "worst_step_error",
        "worst-step error",
        "lower",
        ".4g",
        ".2g",
        "the largest absolute error of a rollout.",
        worst_step_error,
    )
    monkeypatch.setattr(specs, "METRICS", (*specs.METRICS, added))
    sims = {name: configure_simulator(name, defaults={"unseen": "prior"}) for name in METHODS}
    result = evaluate(runs, sims, 2)
    written = result.to_json()["methods"]
    for name in METHODS:
        assert {"worst_step_error", "worst_step_error_std"} <= set(written[name])
        assert {spec.key for spec in specs.METRICS if spec.compute} <= set(written[name])
    header = format_table(result).splitlines()[0]
    labels = [
        spec.label for spec in specs.METRICS if not spec.optional or spec.key in written[METHODS[0]]
    ]
    assert [label in header for label in labels] == [True] * len(labels)
    assert header.index("final-step Spearman") < header.index("worst-step error")
    page = render_report(title="t", runs=runs, evaluation=result)
    table = re.search(r'<table class="metrics" id="metrics">.*?</table>', page, re.S)
    assert table
    heads = re.findall(r"<th>([^<]*)</th>", table.group(0))
    assert heads == ["method", *(spec.label for spec in specs.METRICS)]
    assert "<b>worst-step error</b> (lower is better): the largest absolute error" in page


def test_validation_json_is_read_in_one_place() -> None:
    """`read_validation` knows the layout of `simfluence validate --json`; the text tables and
    the report read it through it (labels from the metric specs)."""
    validation = read_validation({**VALIDATION, "timing": {"seconds": 1.0}})
    assert [kind.name for kind in validation.kinds] == ["random"]
    assert not validation.kinds[0].is_loo and validation.kinds[0].methods["linear"]["lds"] == 0.7
    assert validation.optimized == VALIDATION["optimized"]
    assert validation.rest == {"timing": {"seconds": 1.0}}
    block = {"curricula": 3, **VALIDATION["kinds"]["random"]}
    text = format_validation({"kinds": {"random": block}})
    assert "random (3 curricula)" in text and "final-step Spearman" in text and "LDS" in text
    with pytest.raises(SimfluenceError, match="expected a JSON object"):
        read_validation([1, 2])  # type: ignore[arg-type]


# -- in a real browser ---------------------------------------------------------------------------
def _browser_missing() -> str | None:
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        return (
            f"headless browser test needs {CHROMIUM} and {CHROMEDRIVER} "
            "(apt-get install chromium chromium-driver)"
        )
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "headless browser test needs selenium (pip install selenium)"
    return None


@pytest.fixture(scope="module")
def driver():
    reason = _browser_missing()
    if reason:
        missing_component(reason)  # skipped on a developer's machine, a failure in CI
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1200,1000",
    ):
        options.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="simfluence-chromium-")
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield browser
    finally:
        browser.quit()
        shutil.rmtree(profile, ignore_errors=True)


def test_renders_in_chromium(driver, report: Path) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    driver.get(report.resolve().as_uri())
    severe = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
    assert not severe, severe

    def paths():
        return driver.find_elements(By.CSS_SELECTOR, "#viewer svg path.series")

    assert len(paths()) == 1 + len(METHODS)  # recorded + every method
    names = [p.get_attribute("data-name") for p in paths()]
    assert sorted(names) == sorted(["recorded", *METHODS])

    toggle = driver.find_element(By.CSS_SELECTOR, '#method-toggles input[data-method="mean"]')
    toggle.click()
    assert len(paths()) == len(METHODS)
    assert "mean" not in [p.get_attribute("data-name") for p in paths()]
    toggle.click()
    assert len(paths()) == 1 + len(METHODS)

    def recorded_d():
        return driver.find_element(
            By.CSS_SELECTOR, '#viewer svg path.series[data-name="recorded"]'
        ).get_attribute("d")

    before = recorded_d()
    select = Select(driver.find_element(By.ID, "test-select"))
    assert len(select.options) == 6
    select.select_by_index(3)
    after = recorded_d()
    assert after != before
    assert len(paths()) == 1 + len(METHODS)
    Select(driver.find_element(By.ID, "run-select")).select_by_index(1)
    assert recorded_d() != after

    overlay = driver.find_element(By.CSS_SELECTOR, "#viewer svg rect.overlay")
    ActionChains(driver).move_to_element(overlay).perform()
    tooltip = driver.find_element(By.ID, "tooltip")
    assert tooltip.is_displayed()
    assert "step" in tooltip.text and "linear" in tooltip.text

    severe = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
    assert not severe, severe


def test_a_missing_browser_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    """CI installs Chromium: there, its absence is a failure, not a skipped test."""
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=r"CI=true but .*chromium"):
        missing_component("headless browser test needs /usr/bin/chromium")
    monkeypatch.setenv("CI", "")
    with pytest.raises(pytest.skip.Exception, match="chromium"):
        missing_component("headless browser test needs /usr/bin/chromium")


# -- hostile strings: every id, method name and label reaches the page as text ------------------
#: each would set window.__pwned and change the title if it ran as markup or script
HOSTILE_TEST = "<img src=x onerror=\"window.__pwned=1;document.title='pwned'\">"
HOSTILE_CLOSE = '</script><script>window.__pwned=2;document.title="pwned"</script>'
HOSTILE_SVG = '"><svg onload="window.__pwned=3;document.title=\'pwned\'">'
HOSTILE_AMP = "a&amp;b \u2028 \u2029 ]]> <!-- x"
HOSTILE_METHODS = {
    HOSTILE_TEST.replace("img", "img class=m"): "linear",
    HOSTILE_SVG: "mean",
    "toString": "persistence",  # a name the viewer's lookups must not take from a prototype
}
HOSTILE_TITLE = "<title>" + HOSTILE_CLOSE


@pytest.fixture(scope="module")
def hostile_report(tmp_path_factory) -> tuple[Path, list[str], list[str]]:
    import dataclasses

    runs, _ = generate(SynthConfig(pool=40, tests=6, runs=8, per_run=24, batch=4, epochs=2))
    tests = [HOSTILE_TEST, HOSTILE_CLOSE, HOSTILE_SVG, HOSTILE_AMP, *runs.test_ids[4:]]
    run_ids = [f"{HOSTILE_TEST}-{k}" if k % 2 else f"{HOSTILE_SVG}-{k}" for k in range(8)]
    renamed = [dataclasses.replace(r, run_id=i) for r, i in zip(runs.runs, run_ids, strict=True)]
    runs = dataclasses.replace(runs, test_ids=tests, runs=renamed)
    sims = {
        name: configure_simulator(kind, defaults={"unseen": "prior"})
        for name, kind in HOSTILE_METHODS.items()
    }
    result = evaluate(runs, sims, 2)
    folder = tmp_path_factory.mktemp("hostile")
    path = write_report(
        folder / "report.html",
        title=HOSTILE_TITLE,
        runs=runs,
        evaluation=result,
        attribution={"description": HOSTILE_CLOSE, HOSTILE_SVG: [{HOSTILE_TEST: HOSTILE_SVG}]},
        notes=[HOSTILE_TEST],
    )
    return path, tests, list(result.heldout_runs)


def _csp(text: str) -> dict[str, list[str]]:
    match = re.search(r'<meta http-equiv="Content-Security-Policy" content="([^"]*)">', text)
    assert match, "no Content-Security-Policy meta"
    policy: dict[str, list[str]] = {}
    for part in match.group(1).split(";"):
        name, *values = part.split()
        policy[name] = values
    return policy


def test_the_page_has_a_strict_content_security_policy(report: Path) -> None:
    """Scripts and styles only by the sha256 of the exact inline text; nothing from anywhere."""
    import base64
    import hashlib

    text = report.read_text()
    head = text[: text.index("</head>")]
    policy = _csp(text)
    assert head.index("Content-Security-Policy") < head.index("<style>")
    assert policy["default-src"] == ["'none'"] and policy["connect-src"] == ["'none'"]
    assert policy["img-src"] == ["data:"]
    for directive in ("script-src", "style-src"):
        assert all(v.startswith("'sha256-") for v in policy[directive]), policy[directive]

    def digest(body: str) -> str:
        return "'sha256-" + base64.b64encode(hashlib.sha256(body.encode()).digest()).decode() + "'"

    scripts = re.findall(r"<script>(.*?)</script>", text, re.S)
    styles = re.findall(r"<style>(.*?)</style>", text, re.S)
    assert len(scripts) == 1 and len(styles) == 1
    assert policy["script-src"] == [digest(scripts[0])]
    assert policy["style-src"] == [digest(styles[0])]
    assert " style=" not in text  # no inline style attributes (the policy would block them)


def test_the_embedded_data_cannot_close_its_script(hostile_report) -> None:
    path, tests, _ = hostile_report
    text = path.read_text()
    blob = re.search(r'id="simfluence-data">(.*?)</script>', text, re.S)
    assert blob
    for char in "<>&\u2028\u2029":
        assert char not in blob.group(1)
    assert _data(text)["test_ids"] == tests  # and it still reads back exactly
    assert text.count("<script") == 2 and "<img src=x" not in text and "<svg onload" not in text


def test_hostile_strings_stay_text_in_chromium(driver, hostile_report) -> None:
    """Test ids, run ids and method names that are markup or script show as literal text when
    every one is selected and hovered; nothing runs, no element is injected."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    path, tests, heldout = hostile_report
    driver.get_log("browser")  # only this page's messages below
    driver.get(path.resolve().as_uri())
    methods = list(HOSTILE_METHODS)

    def text(by, what):  # the text as the page holds it (.text would fold white space)
        return driver.find_element(by, what).get_attribute("textContent")

    def ids(select):
        return [o.get_attribute("textContent").split("  (moves")[0] for o in select.options]

    def pwned():
        return driver.execute_script(
            "return [window.__pwned === undefined, document.title,"
            " document.querySelectorAll('img[src=x], svg[onload], img.m').length]"
        )

    assert pwned() == [True, HOSTILE_TITLE, 0]
    assert driver.title == HOSTILE_TITLE
    runs = Select(driver.find_element(By.ID, "run-select"))
    assert [o.get_attribute("textContent") for o in runs.options] == [
        f"{r} (12 steps)" for r in heldout
    ]
    toggles = text(By.ID, "method-toggles")
    assert all(m in toggles for m in methods), toggles
    for r in range(len(runs.options)):
        runs.select_by_index(r)
        select = Select(driver.find_element(By.ID, "test-select"))
        shown = ids(select)
        assert sorted(shown) == sorted(tests)
        for k in range(len(select.options)):
            select.select_by_index(k)
            paths = driver.find_elements(By.CSS_SELECTOR, "#viewer svg path.series")
            assert sorted(p.get_attribute("data-name") for p in paths) == sorted(
                ["recorded", *methods]
            )
            table = text(By.ID, "trajectory-errors")
            assert f"{shown[k]} in {heldout[r]}" in table, table
            assert all(m in table for m in methods)
            overlay = driver.find_element(By.CSS_SELECTOR, "#viewer svg rect.overlay")
            ActionChains(driver).move_to_element(overlay).perform()
            tip = text(By.ID, "tooltip")
            assert all(m in tip for m in methods), tip
            assert pwned() == [True, HOSTILE_TITLE, 0]
    for m in methods:  # a hostile method name toggles like any other
        box = [
            b
            for b in driver.find_elements(By.CSS_SELECTOR, "#method-toggles input")
            if b.get_attribute("data-method") == m
        ]
        box[0].click()
        names = [
            p.get_attribute("data-name")
            for p in driver.find_elements(By.CSS_SELECTOR, "#viewer svg path.series")
        ]
        assert m not in names
        box[0].click()
    filt = driver.find_element(By.ID, "test-filter")
    filt.send_keys("<img")
    assert ids(Select(driver.find_element(By.ID, "test-select"))) == [HOSTILE_TEST]
    assert HOSTILE_TEST in text(By.ID, "trajectory-errors")
    body = text(By.TAG_NAME, "main")
    assert HOSTILE_CLOSE in body and HOSTILE_SVG in body  # server-side text, shown literally
    assert pwned() == [True, HOSTILE_TITLE, 0]
    severe = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
    assert not severe, severe
    # and the policy is in force: markup injected anyway would not run
    driver.execute_script(
        "document.body.insertAdjacentHTML('beforeend',"
        ' \'<img src="data:,x" onerror="window.__pwned=4">'
        '<svg onload="window.__pwned=5"></svg>\');'
    )
    time.sleep(0.3)
    assert driver.execute_script("return window.__pwned === undefined")
    blocked = [e["message"] for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
    assert blocked and all("Content Security Policy" in m for m in blocked), blocked
