"""Build the HTML report of the demo synthetic run set and screenshot it in headless Chromium.

    python benchmarks/screenshot_report.py [--out docs/figures/report.png] [--html report.html]

Needs /usr/bin/chromium, /usr/bin/chromedriver (Debian: chromium chromium-driver) and selenium.
The screenshot shows the metrics table and the trajectory viewer with the hover read-out.
"""

from __future__ import annotations

import argparse
import io
import shutil
import tempfile
from pathlib import Path

from simfluence.evaluation import evaluate
from simfluence.plots import pick_test_examples, plot_method_grid
from simfluence.report import write_report
from simfluence.runlog.layout import TRUTH_FILE
from simfluence.simulators import configure_simulator
from simfluence.simulators.methods import DEFAULT_EVALUATE_METHODS
from simfluence.synth import SynthConfig, write_synthetic

METHODS = [*DEFAULT_EVALUATE_METHODS, "truth"]
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--force-device-scale-factor=1",
]


def build(folder: Path, html: Path) -> Path:
    """Write the demo run set into `folder`, evaluate `METHODS`, write the report to `html`."""
    runs = write_synthetic(folder / "runs", SynthConfig())
    options = {"unseen": "error", "path": str(folder / "runs" / TRUTH_FILE)}
    sims = {name: configure_simulator(name, defaults=options) for name in METHODS}
    result = evaluate(runs, sims, 5)
    run = runs.run(result.heldout_runs[0])
    figure = folder / "methods.png"
    plot_method_grid(
        run.losses,
        {name: m.simulated[0] for name, m in result.methods.items()},
        runs.test_ids,
        pick_test_examples(run.losses, 4),
        f"held-out run {run.run_id}",
        figure,
    )
    return write_report(
        html,
        title="simfluence report: synthetic demo set",
        runs=runs,
        evaluation=result,
        figures={f"per-method rollouts, held-out run {run.run_id}": figure},
    )


def screenshot(html: Path, out: Path) -> None:
    """Open `html`, hover the viewer, save the metrics-to-viewer region as a PNG."""
    from PIL import Image
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in FLAGS:
        options.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="simfluence-chromium-")
    options.add_argument(f"--user-data-dir={profile}")
    options.add_argument("--window-size=1200,2600")
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        driver.get(html.resolve().as_uri())
        overlay = driver.find_element(By.CSS_SELECTOR, "#viewer svg rect.overlay")
        width = overlay.rect["width"]
        ActionChains(driver).move_to_element_with_offset(overlay, int(width * 0.18), 0).perform()
        top = driver.find_element(By.ID, "metrics-section").rect["y"] - 8
        bottom_el = driver.find_element(By.ID, "trajectory-errors")
        bottom = bottom_el.rect["y"] + bottom_el.rect["height"] + 16
        image = Image.open(io.BytesIO(driver.get_screenshot_as_png()))
        left = driver.find_element(By.TAG_NAME, "main").rect
        crop = (int(left["x"]), int(top), int(left["x"] + left["width"]), int(bottom))
        out.parent.mkdir(parents=True, exist_ok=True)
        image.crop(crop).save(out, optimize=True)
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/figures/report.png")
    parser.add_argument("--html", default=None, help="also keep the report here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        html = Path(args.html) if args.html else Path(tmp) / "report.html"
        build(Path(tmp), html)
        screenshot(html, Path(args.out))
    print(f"wrote {args.out}" + (f" and {args.html}" if args.html else ""))


if __name__ == "__main__":
    main()
