"""The app in a real browser: Playwright driving Debian's Chromium against `lance app`.

One server per module (a free localhost port, its own LANCE_HOME). The suite opens the app on the
default (digits + small-cnn), starts a short fine-tune, watches the charts grow, reloads and finds
the run, stops it, finds it in the runs table, and opens the spectra and budget pages. It also
measures the two latencies that docs/app.md reports (targets, printed as "browser measurements"; the
tests fail only on a hang, since this CPU is shared and timings are not pass marks):

- first render: from the server's health check answering to the Setup page fully drawn (target < 5 s);
- live update: from a metric row committed to the store to the new point in the page's chart (target < 2 s).

Screenshots go to $LANCE_APP_SCREENSHOTS when set (docs/screenshots is made that way), else to a
temporary folder.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

from engine.store import RunStore
from lance_app.continual_view import MATRICES_TITLE

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
RESULTS: dict = {}

if not os.path.exists(CHROMIUM):
    pytest.skip(f"Chromium not found at {CHROMIUM} (install it with `apt-get install chromium`)",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (python package) not installed")

# A chart's point count, found by its title; Streamlit renders each st.plotly_chart as a .js-plotly-plot.
FIRST_RENDER_HANG_S = 30.0  # a page slower than this is broken, not merely on a busy CPU
UPDATE_HANG_S = 15.0
POINTS_JS = """(title) => {
  for (const gd of document.querySelectorAll('.js-plotly-plot')) {
    const raw = gd.layout && gd.layout.title && (gd.layout.title.text || gd.layout.title);
    const t = typeof raw === 'string' ? raw.replace(/<[^>]*>/g, '') : '';  // Streamlit's theme adds <b>
    if (t === title) { return (gd.data || []).reduce((n, tr) => n + ((tr.x || []).length), 0); }
  }
  return -1;
}"""
# Record (points, wall-clock seconds) each time the chart's point count changes, every 10 ms, and how
# many different plot elements drew it.
WATCH_JS = """(title) => {
  window.__seen = []; window.__nodes = []; let last = -2;
  const count = """ + POINTS_JS + """;
  window.__watch = setInterval(() => {
    const n = count(title);
    if (n !== last) { last = n; window.__seen.push([n, Date.now() / 1000]); }
    for (const gd of document.querySelectorAll('.js-plotly-plot')) {
      const raw = gd.layout && gd.layout.title && (gd.layout.title.text || gd.layout.title);
      const t = typeof raw === 'string' ? raw.replace(/<[^>]*>/g, '') : '';
      if (t === title && !window.__nodes.includes(gd)) window.__nodes.push(gd);
    }
  }, 10);
}"""


# Every st.dataframe as rows of cell texts (header first): Streamlit's grid draws on a canvas and keeps an
# accessible table (role=row / gridcell) beside it.
TABLES_JS = """() => [...document.querySelectorAll('[data-testid=stDataFrame]')].map(t =>
  [...t.querySelectorAll('[role=row]')].map(r =>
    [...r.querySelectorAll('[role=gridcell],[role=columnheader]')].map(c => c.innerText.trim())))"""
# One trace of a chart found by its title: {x, y} of the trace named `name` (null when absent).
TRACE_JS = """([title, name]) => {
  for (const gd of document.querySelectorAll('.js-plotly-plot')) {
    const raw = gd.layout && gd.layout.title && (gd.layout.title.text || gd.layout.title);
    const t = typeof raw === 'string' ? raw.replace(/<[^>]*>/g, '') : '';
    if (t !== title) continue;
    const tr = (gd.data || []).find(d => d.name === name);
    return tr ? {x: Array.from(tr.x || []), y: Array.from(tr.y || [])} : null;
  }
  return null;
}"""

SHAPES_X_JS = """(title) => {
  for (const gd of document.querySelectorAll('.js-plotly-plot')) {
    const raw = gd.layout && gd.layout.title && (gd.layout.title.text || gd.layout.title);
    const t = typeof raw === 'string' ? raw.replace(/<[^>]*>/g, '') : '';
    if (t === title) return (gd.layout.shapes || []).map(s => s.x0);
  }
  return null;
}"""


def _by(table: list[dict], method: str) -> dict:
    return next(r for r in table if r["method"] == method)


def _table(page, first_header: str, has: str) -> list[dict]:
    """The st.dataframe whose header starts with ``first_header`` and names ``has``, as dicts per row."""
    for rows in page.evaluate(TABLES_JS):
        if rows and rows[0] and rows[0][0] == first_header and has in rows[0]:
            return [dict(zip(rows[0], r)) for r in rows[1:] if r]
    return []


def _wait_table(page, first_header: str, has: str, rows: int, timeout_s: float = 120) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        table = _table(page, first_header, has)
        if len(table) >= rows:
            return table
        page.wait_for_timeout(300)
    raise AssertionError(f"no table {first_header!r}…{has!r} with {rows} rows in {timeout_s:.0f} s: "
                         f"{page.evaluate(TABLES_JS)}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _shot_dir(tmp_path_factory) -> Path:
    target = os.environ.get("LANCE_APP_SCREENSHOTS")
    path = Path(target) if target else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


def _start_server(home: Path):
    """`lance app` on a free port with LANCE_HOME=home; returns (process, base_url, monotonic time of
    the first `ok` from /_stcore/health)."""
    port = _free_port()
    env = dict(os.environ, LANCE_HOME=str(home), PYTHONUNBUFFERED="1")
    log = open(home / "server.log", "ab")
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "engine", "app", "--port", str(port),
                             "--address", "127.0.0.1"], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, cwd=str(REPO))
    log.close()
    base = f"http://127.0.0.1:{port}"
    while time.monotonic() - start < 60:
        try:
            with urllib.request.urlopen(base + "/_stcore/health", timeout=1) as r:
                if r.read().strip() == b"ok":
                    return proc, base, time.monotonic()
        except OSError:
            time.sleep(0.05)
    _stop_server(proc)
    pytest.fail("the app server did not answer /_stcore/health within 60 s:\n"
                + (home / "server.log").read_text()[-3000:])


def _stop_server(proc) -> None:
    try:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=10)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def server(browser, tmp_path_factory):
    """`lance app` with its own LANCE_HOME; yields (base_url, home, time the server came up)."""
    home = tmp_path_factory.mktemp("app_home")
    proc, base, up = _start_server(home)
    yield base, home, up
    from lance_app.jobs import JobRunner

    for job in JobRunner(home).list(active_only=True):  # jobs live in their own process groups
        try:
            os.killpg(job.pid, signal.SIGINT)
        except ProcessLookupError:
            pass
    _stop_server(proc)
    if RESULTS:
        print("\nbrowser measurements:", json.dumps(RESULTS))


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    return _shot_dir(tmp_path_factory)


def _new_page(browser, height: int = 1000):
    page = browser.new_page(viewport={"width": 1400, "height": height})
    page.set_default_timeout(60_000)
    return page


def _points(page, title: str) -> int:
    return page.evaluate(POINTS_JS, title)


def _wait_points(page, title: str, at_least: int, timeout_s: float = 90) -> int:
    # the count the wait saw (a second read could land mid-rerun, when the chart is briefly absent)
    js = f"(n) => {{ const k = ({POINTS_JS})({json.dumps(title)}); return k >= n ? k : 0; }}"
    handle = page.wait_for_function(js, arg=at_least, timeout=timeout_s * 1000)
    return int(handle.json_value())


def _first_render_s(browser, base: str, up: float) -> tuple[float, float, object]:
    """(seconds to the title, seconds to the whole Setup page, page) from the server coming up."""
    page = _new_page(browser, height=1300)
    page.goto(base)
    page.get_by_role("heading", name="Setup").wait_for()
    title_s = time.monotonic() - up
    page.get_by_text("Current setup:").wait_for()  # the last element: the whole page is drawn
    return title_s, time.monotonic() - up, page


def test_first_page_renders(server, browser, shots, tmp_path):
    base, _, up = server
    title_s, full_s, page = _first_render_s(browser, base, up)
    RESULTS.update(first_title_s=round(title_s, 2), first_page_full_s=round(full_s, 2))
    if full_s >= 5.0:  # one more fresh server: this CPU is shared, a burst elsewhere can eat seconds
        page.close()
        proc, base2, up2 = _start_server(tmp_path)
        try:
            title_s, full_s, page2 = _first_render_s(browser, base2, up2)
            page2.close()
        finally:
            _stop_server(proc)
        RESULTS.update(retry_first_title_s=round(title_s, 2), retry_first_page_full_s=round(full_s, 2))
        page = _new_page(browser, height=1300)
        page.goto(base)
        page.get_by_text("Current setup:").wait_for()
    # The 5 s target is a measurement (printed with RESULTS, reported in docs/app.md), not a pass mark:
    # this CPU is shared. The assertion only catches a page that hangs.
    assert full_s < FIRST_RENDER_HANG_S, f"Setup page fully drawn {full_s:.2f} s after the server came up ({RESULTS})"
    page.wait_for_function("document.querySelectorAll('[data-testid=stDataFrame] canvas').length >= 2")
    page.get_by_role("slider").first.wait_for()
    page.wait_for_timeout(1500)  # let the grids paint before the screenshot
    page.screenshot(path=str(shots / "setup.png"), full_page=True)
    page.close()


def test_finetune_live_reload_stop_and_runs_table(server, browser, shots):
    base, home, _ = server
    page = _new_page(browser, height=1900)
    page.goto(base + "/finetune")
    page.get_by_role("heading", name="Fine-tune").wait_for()
    page.get_by_label("Epochs").fill("100")
    page.get_by_label("Training images (0 = all)").fill("256")
    page.get_by_label("Batch size").fill("32")
    page.get_by_role("button", name="Start fine-tuning").click()
    page.wait_for_url("**/finetune?job=*")
    job_id = page.url.split("job=")[1]
    first = _wait_points(page, "training loss", 2, timeout_s=120)
    grown = _wait_points(page, "training loss", first + 2, timeout_s=60)  # the charts grow live
    assert grown >= first + 2
    page.screenshot(path=str(shots / "finetune.png"), full_page=True)

    page.reload()  # re-attach through ?job=
    page.get_by_text(f"Job {job_id}").first.wait_for()
    after = _wait_points(page, "training loss", grown, timeout_s=60)
    assert after >= grown
    page.get_by_role("button", name="Stop").click()
    store = RunStore(home, mark_orphans=False)
    deadline = time.monotonic() + 30
    while any(r["status"] == "running" for r in store.list_runs(job_id=job_id)) and time.monotonic() < deadline:
        time.sleep(0.2)
    runs = sorted(store.list_runs(job_id=job_id), key=lambda r: r["created_at"])
    assert runs[-1]["status"] == "interrupted"  # the run that was training when Stop was pressed
    runs = runs[-1:]
    page.get_by_text("· interrupted").first.wait_for(timeout=30_000)
    assert RunStore(home, mark_orphans=False).metrics(runs[0]["id"], key="loss")  # rows so far kept

    page.goto(base + "/runs")
    page.get_by_role("heading", name="Runs").wait_for()
    page.get_by_text("1 interrupted").wait_for()
    page.get_by_text(f"#{runs[0]['id'][-6:]}").first.wait_for()  # selected in the compare box
    page.locator(".js-plotly-plot").first.wait_for()
    page.screenshot(path=str(shots / "runs.png"), full_page=True)
    page.close()


STANDIN_WRITER = textwrap.dedent('''
    import json, random, sys, time
    from engine.store import RunStore
    out, job_id = sys.argv[2], sys.argv[sys.argv.index("--job-id") + 1]
    store = RunStore()
    run = store.create_run(kind="finetune", method="vanilla", config={"epochs": 1}, job_id=job_id)
    go = out + ".go"
    import os
    while not os.path.exists(go):  # the test creates it once the page is attached and watching
        time.sleep(0.05)
    written = []
    random.seed(0)
    for step in range(1, 9):
        time.sleep(0.9 + random.random())  # not aligned with the page's 1 s poll
        store.log_metrics(run, [{"step": step, "epoch": 0, "split": "train", "key": "loss", "value": 1.0 / step}])
        written.append(time.time())  # the row is committed once log_metrics returns
    json.dump(written, open(out, "w"))
    store.set_status(run, "completed")
''')


def test_chart_update_follows_the_row(server, browser, tmp_path):
    """A writer process, started as a job by another JobRunner (as a restarted server would find it
    through its record), logs a row every ~1.4 s and notes when each commit returned; the page
    records when each point appears in its chart."""
    base, home, _ = server
    script = tmp_path / "writer.py"
    script.write_text(STANDIN_WRITER)
    from lance_app.jobs import JobRunner

    runner = JobRunner(home, command=[sys.executable, str(script)])
    out = tmp_path / "written.json"
    job = runner.start("finetune", [str(out)])
    page = _new_page(browser)
    page.goto(f"{base}/finetune?job={job.job_id}")
    page.get_by_text(f"Job {job.job_id}").first.wait_for()
    page.wait_for_function("document.querySelectorAll('.js-plotly-plot').length >= 6")  # plotly loaded
    page.evaluate(WATCH_JS, "training loss")
    time.sleep(2.0)
    Path(str(out) + ".go").touch()
    assert runner.wait(job.job_id, timeout_s=60) == 0
    written = json.loads(out.read_text())
    page.wait_for_function(f"({POINTS_JS})('training loss') >= 8", timeout=10_000)
    seen = page.evaluate("window.__seen")
    n_nodes = page.evaluate("window.__nodes.length")
    page.close()
    # no flicker: once drawn, the chart never blanks (-1: absent) or shrinks between polls, and the one
    # plot element is updated in place
    counts = [n for n, _ in seen]
    # No visible flicker. Streamlit's plotly element is keyed by its spec, so a new row remounts the chart
    # (one plot element per drawn point count; idle polls resend the same figure and redraw nothing); the
    # swap may leave the chart absent (-1) for a frame or two, never for a visible time, and it never
    # shrinks or goes back.
    drawn = [n for n in counts if n >= 0]
    assert counts[0] >= 0 and drawn == sorted(drawn), counts
    blanks = [seen[i + 1][1] - t for i, (n, t) in enumerate(seen[:-1]) if n < 0]
    RESULTS.update(chart_blank_ms=[round(1000 * b) for b in blanks], chart_elements=n_nodes)
    assert all(b < 0.3 for b in blanks), blanks
    # at most one remount without a new row: one was seen once in about five full-suite runs (10 elements for
    # 9 point counts, the test passing alone 3/3 right after); any swap is still held to the blank bound above
    assert n_nodes <= len(set(drawn)) + 1, (n_nodes, counts)
    latencies = []
    for k, t_written in enumerate(written, start=1):
        t_seen = next(t for n, t in seen if n >= k)
        latencies.append(t_seen - t_written)
    RESULTS.update(update_latency_s=[round(x, 3) for x in latencies])
    assert len(latencies) == 8 and min(latencies) > 0
    assert max(latencies) < UPDATE_HANG_S, latencies  # the 2 s target is measured (RESULTS), not asserted


def test_spectra_and_budget_pages_draw_their_charts(server, browser, shots):
    base, _, _ = server
    page = _new_page(browser, height=2300)
    page.goto(base + "/spectra")
    page.get_by_role("heading", name="Spectra").wait_for()
    assert _wait_points(page, "perplexity of the fine-tuned layers", 8, timeout_s=120) >= 16
    assert _points(page, "compression factor per layer and ε") > 0  # -1: no such chart; 0: no ε columns
    page.wait_for_function("document.querySelectorAll('.js-plotly-plot').length >= 3")
    page.screenshot(path=str(shots / "spectra.png"), full_page=True)
    page.goto(base + "/budget")
    page.get_by_role("heading", name="Budget").wait_for()
    assert _wait_points(page, "activation bytes per fine-tuned layer", 8, timeout_s=60) == 8  # 4 layers x 2 bars
    field = page.get_by_label("type an exact budget", exact=False)
    field.fill("10")
    page.keyboard.press("Enter")
    page.get_by_text("least total that fits is").wait_for()
    field.fill("16KiB")
    page.keyboard.press("Enter")
    page.get_by_text("Chosen total").wait_for()
    page.wait_for_function("() => new URLSearchParams(location.search).get('budget_text') === '16KiB'")
    front = "Σ perplexity against the budget (exact front)"
    before = _wait_plan_drawn(page, front, budget_bytes=16 * 1024)
    # drag the log slider with the keyboard: the exact budget field (and the URL) follow it, upwards
    page.get_by_role("slider").first.focus()
    for _ in range(8):
        page.keyboard.press("ArrowRight")
    moved = _settled_budget(page, field)  # the field (and the URL) follow the slider, step by step
    assert moved > 16 * 1024, moved
    after = _wait_plan_drawn(page, front, budget_bytes=moved)
    # the front's marker and the rank table moved with the slider: a larger budget buys more bytes and a
    # lower Σ perplexity, and the marker sits where the table's bytes add up
    assert after["marker_bytes"] > before["marker_bytes"] and after["marker_perplexity"] < before["marker_perplexity"]
    assert after["ranks"] != before["ranks"]
    page.screenshot(path=str(shots / "budget.png"), full_page=True)
    # "Train this plan" opens Fine-tune with ?plan=ID; a reload keeps the plan
    page.get_by_role("button", name="Train this plan").click()
    page.wait_for_function("() => new URLSearchParams(location.search).get('plan')", timeout=60_000)
    page.get_by_text("Training plan").first.wait_for(timeout=60_000)
    plan_id = page.evaluate("() => new URLSearchParams(location.search).get('plan')")
    page.reload()
    page.get_by_text("Training plan").first.wait_for(timeout=60_000)
    page.get_by_text(plan_id, exact=False).first.wait_for(timeout=60_000)
    assert page.evaluate("() => new URLSearchParams(location.search).get('plan')") == plan_id
    PLAN_SEEN.update(id=plan_id, marker_bytes=after["marker_bytes"], ranks=after["ranks"])
    page.close()


PLAN_SEEN: dict = {}  # the plan the budget test sent to the Fine-tune page (the next test trains it)


def _settled_budget(page, field, timeout_s: float = 60) -> int:
    """The exact budget field's value once the slider's steps have all arrived: digits, the same for 1.5 s,
    and the URL's ``budget_text`` equal to it."""
    deadline = time.monotonic() + timeout_s
    last, since = None, time.monotonic()
    while time.monotonic() < deadline:
        value = field.input_value()
        url = page.evaluate("() => new URLSearchParams(location.search).get('budget_text')")
        if value != last:
            last, since = value, time.monotonic()
        elif value.isdigit() and url == value and time.monotonic() - since > 1.5:
            return int(value)
        page.wait_for_timeout(200)
    raise AssertionError(f"the budget field did not settle after the slider moved: {last!r}")


def _wait_plan_drawn(page, front: str, budget_bytes: int, timeout_s: float = 60) -> dict:
    """The Budget page once it shows the plan for ``budget_bytes``: the front's marker (bytes, Σ perplexity)
    and the rank table's rows; the marker's bytes equal the table's bytes column summed."""
    deadline = time.monotonic() + timeout_s
    while True:
        lines = page.evaluate(SHAPES_X_JS, front)  # the dashed budget line and the dotted vanilla line
        marker = page.evaluate(TRACE_JS, [front, "this plan"])
        table = _table(page, "layer", "vanilla bytes")
        budget_drawn = bool(lines) and any(abs(float(x) - budget_bytes) < 1 for x in lines)
        if budget_drawn and marker and table and sum(int(r["bytes"]) for r in table) == round(marker["x"][0]):
            return {"marker_bytes": float(marker["x"][0]), "marker_perplexity": float(marker["y"][0]),
                    "ranks": [[r["layer"], r["B"], r["C"], r["H"], r["W"], r["F"]] for r in table]}
        if time.monotonic() > deadline:
            raise AssertionError(f"the Budget page did not show the plan for {budget_bytes} B: lines at {lines}, "
                                 f"marker {marker}, table {table}")
        page.wait_for_timeout(200)


def test_train_this_plan_then_the_end_of_job_table(server, browser, shots):
    """The plan the Budget test sent: started from the Fine-tune page, the job trains exactly it (ASI's
    measured layer bytes = the plan's total = the front's marker), and the page ends with the summary table."""
    assert PLAN_SEEN, "needs test_spectra_and_budget_pages_draw_their_charts (it makes the plan)"
    base, home, _ = server
    page = _new_page(browser, height=2600)
    page.goto(f"{base}/finetune?plan={PLAN_SEEN['id']}")
    page.get_by_text("Training plan").first.wait_for(timeout=60_000)
    page.get_by_role("spinbutton", name="Epochs", exact=True).fill("1")
    page.get_by_role("spinbutton", name="Training images (0 = all)", exact=True).fill("256")
    page.get_by_role("spinbutton", name="Validation images (0 = all)", exact=True).fill("200")
    page.keyboard.press("Tab")
    page.wait_for_timeout(500)
    page.get_by_role("button", name="Start fine-tuning").click()
    page.wait_for_url("**/finetune?*job=*")
    job_id = page.url.split("job=")[1].split("&")[0]
    from lance_app.jobs import JobRunner

    job = JobRunner(home).get(job_id)
    assert job.extra["plan"] == PLAN_SEEN["id"] and "--ranks" in job.argv  # the job trains the plan's file
    page.get_by_text(f"Job {job_id}").first.wait_for()
    table = _wait_table(page, "method", "× vs vanilla (layer)", rows=2, timeout_s=240)
    page.get_by_role("heading", name="Summary", exact=True).wait_for(timeout=60_000)  # the job ended
    table = _wait_table(page, "method", "× vs vanilla (layer)", rows=2)  # (redrawn once at the end)
    assert [r["method"] for r in table] == ["vanilla", "asi"] and {r["status"] for r in table} == {"completed"}
    runs = {r["method"]: r for r in RunStore(home, mark_orphans=False).list_runs(job_id=job_id)}
    asi = runs["asi"]["summary"]
    assert asi["plan_source"] and asi["plan_total_bytes"] == round(PLAN_SEEN["marker_bytes"])
    assert asi["layer_activation_bytes"] == asi["plan_total_bytes"]  # measured = planned = the marker
    vanilla = runs["vanilla"]["summary"]
    ratio = float(table[1]["× vs vanilla (layer)"])
    assert ratio == round(vanilla["layer_activation_bytes"] / asi["layer_activation_bytes"], 1) and ratio > 1
    assert float(table[0]["final acc %"]) == round(vanilla["val_acc"], 2)
    page.wait_for_timeout(1000)
    page.screenshot(path=str(shots / "finetune_compare.png"), full_page=True)
    page.close()


def test_continual_methods_side_by_side(server, browser, shots):
    """A real three-method task sequence on split digits, started from the page: one summary row per
    method (ACC, BWT, peaks) and one accuracy matrix per method in the same chart."""
    base, home, _ = server
    page = _new_page(browser, height=2600)
    page.goto(base + "/continual")
    page.get_by_role("heading", name="Continual learning").wait_for()
    page.locator(".st-key-cl_methods input").click()  # the form's default: lance, finetune; add gpm
    page.get_by_role("option", name="gpm", exact=True).click()
    page.keyboard.press("Escape")
    page.get_by_role("spinbutton", name="Training images per task (0 = all)", exact=True).fill("40")
    page.keyboard.press("Tab")
    page.get_by_role("spinbutton", name="Batch size", exact=True).fill("16")
    page.keyboard.press("Tab")
    # three SGD steps per task: at the default lr 0.01 finetune's old tasks move by noise only (its BWT was
    # +1.39 on seed 0, −1.40 on seed 1); at 0.1 it forgets (−7.65, −5.93, −1.06 on seeds 0-2, the protected
    # methods −0.35 … +0.34: `lance continual --benchmark split-digits --limit-train 40 --batch-size 16 --lr 0.1`)
    page.get_by_role("spinbutton", name="SGD learning rate", exact=True).fill("0.1")
    page.keyboard.press("Tab")
    page.get_by_role("button", name="Start task sequence").click()
    page.wait_for_url("**/continual?*job=*")
    job_id = page.url.split("job=")[1].split("&")[0]
    table = _wait_table(page, "method", "BWT", rows=3, timeout_s=300)
    deadline = time.monotonic() + 300
    store = RunStore(home, mark_orphans=False)
    while any(r["status"] in ("running", "created") for r in store.list_runs(job_id=job_id)):
        assert time.monotonic() < deadline, "the task sequence did not end in 300 s"
        time.sleep(0.5)
    page.get_by_text("finished").first.wait_for(timeout=60_000)
    page.wait_for_timeout(2500)  # the last poll
    table = _table(page, "method", "BWT")
    runs = {r["method"]: r for r in RunStore(home, mark_orphans=False).list_runs(job_id=job_id)}
    assert sorted(r["method"] for r in table) == sorted(runs) == ["finetune", "gpm", "lance"]
    assert all(r["config"]["training"]["lr"] == 0.1 for r in runs.values())  # the form's value reached the runs
    store = RunStore(home, mark_orphans=False)
    for row in table:  # the row's ACC / BWT: the run's last task row (after task 4), to the 2 decimals shown
        run_id = runs[row["method"]]["id"]
        for key, column in (("ACC", "ACC %"), ("BWT", "BWT")):
            last = store.metrics(run_id, key=key, split="task")[-1]
            assert last["task"] == 4 and float(row[column]) == pytest.approx(last["value"], abs=0.006)
    assert float(_by(table, "finetune")["BWT"]) < min(float(_by(table, m)["BWT"]) for m in ("lance", "gpm"))
    matrices = page.evaluate("""(title) => { for (const gd of document.querySelectorAll('.js-plotly-plot')) {
        const raw = gd.layout && gd.layout.title && (gd.layout.title.text || gd.layout.title);
        if (typeof raw === 'string' && raw.replace(/<[^>]*>/g, '') === title)
          return gd.data.filter(d => d.type === 'heatmap').map(d => d.z.length); } return null; }""",
                             MATRICES_TITLE)
    assert matrices == [5, 5, 5], matrices  # split digits: 5 tasks, one 5×5 matrix per method, side by side
    page.screenshot(path=str(shots / "continual.png"), full_page=True)
    page.close()
