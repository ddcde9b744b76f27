"""The Sweep page in a real browser (Playwright + Debian's Chromium against `lance app`): the front of a
sweep the test made (real runs in the real store) is drawn with one trace per method, error bars, log x;
choosing a configuration lists its runs."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from engine.store import RunStore
from engine.store.sweeps import SweepStore
from engine.sweep import SweepSpec, prepare_sweep, sweep_results
from engine.sweep.trial import execute_trial
from lance_app.sweep_view import FRONT_TITLE

pytestmark = [pytest.mark.browser, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]
if not os.path.exists(CHROMIUM):
    pytest.skip(f"Chromium not found at {CHROMIUM} (install it with `apt-get install chromium`)",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (python package) not installed")

FRONT_JS = """(title) => {
  for (const gd of document.querySelectorAll('.js-plotly-plot')) {
    const raw = gd.layout && gd.layout.title && (gd.layout.title.text || gd.layout.title);
    const t = typeof raw === 'string' ? raw.replace(/<[^>]*>/g, '') : '';
    if (t === title) {
      return {xtype: gd.layout.xaxis.type, traces: (gd.data || []).filter(d => d.mode === 'markers').map(d => (
        {name: d.name, x: Array.from(d.x), y: Array.from(d.y), err: Array.from(d.error_y.array)}))};
    }
  }
  return null;
}"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def app_with_sweep(tmp_path):
    home = tmp_path / "lance_home"
    store = RunStore(home)
    spec = SweepSpec(methods=["asi", "lance"], seeds=[0, 1], axes={"budget": ["12kB", "40kB"]},
                     base={"layers": 2, "epochs": 1, "limit_train": 96, "limit_val": 64, "batch_size": 32})
    sweep_id, spec, trials = prepare_sweep(spec, store)
    for trial in trials:
        assert execute_trial(spec.to_dict(), trial.to_dict(), str(home), sweep_id)["status"] == "completed"
    SweepStore(store).set_sweep_status(sweep_id, "completed")
    port = _free_port()
    log = open(tmp_path / "server.log", "ab")  # noqa: SIM115 - handed to the server process
    proc = subprocess.Popen([sys.executable, "-m", "engine", "app", "--port", str(port), "--address", "127.0.0.1"],
                            env=dict(os.environ, LANCE_HOME=str(home)), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, cwd=str(REPO))
    log.close()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(base + "/_stcore/health", timeout=1) as r:
                if r.read().strip() == b"ok":
                    break
        except OSError:
            if time.monotonic() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                pytest.fail("app server did not come up:\n" + (tmp_path / "server.log").read_text()[-3000:])
            time.sleep(0.1)
    yield base, sweep_results(sweep_id, store)
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def test_sweep_page_draws_the_front_of_a_sweep(app_with_sweep, tmp_path):
    base, results = app_with_sweep
    sweep_id = results["sweep"]["id"]
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1600})
        page.set_default_timeout(60_000)
        page.goto(f"{base}/sweep?sweep={sweep_id}")
        page.get_by_role("heading", name="Sweep").wait_for()
        page.wait_for_function(f"() => ({FRONT_JS})({FRONT_TITLE!r}) !== null")
        drawn = page.evaluate(FRONT_JS, FRONT_TITLE)
        assert drawn["xtype"] == "log"
        by_method = {t["name"]: t for t in drawn["traces"]}
        assert sorted(by_method) == ["asi", "lance"]
        for c in results["configurations"]:
            trace = by_method[c["method"]]
            pairs = list(zip(trace["x"], trace["y"]))
            assert (pytest.approx(c["metrics"]["peak_layer_activation_bytes"]["mean"]),
                    pytest.approx(c["metrics"]["accuracy"]["mean"])) in pairs
        assert sum(len(t["x"]) for t in drawn["traces"]) == 4
        page.get_by_text("8/8 trials completed").wait_for()
        page.screenshot(path=str(tmp_path / "sweep.png"), full_page=True)
        if os.environ.get("LANCE_APP_SCREENSHOTS"):
            shutil.copy(tmp_path / "sweep.png", Path(os.environ["LANCE_APP_SCREENSHOTS"]) / "sweep.png")
        browser.close()
