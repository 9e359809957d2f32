"""The web UI as a person sees it: a demo lake served by `dagster dev` (webserver and daemon),
opened in Debian's headless Chromium, each assertion made on what the page renders. Every
view is saved as a screenshot under data/ui/, and a view whose screenshot is missing fails."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from candlestack.lake import Lake, month_of
from tests.conftest import isolated_env

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SCREENSHOTS = ROOT / "data" / "ui"
# Without the background-networking flags Chromium dials out, and a closed network refuses it.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1600,1000",
)
WAIT_S = 60
SYMBOLS = ("BTC-USDT", "ETH-USDT", "SOL-USDT")
TRIP_REASON = "ui test: tripped by hand"
# After the demo, in one process: store one more day's candles (argv[1], two days before the
# demo's first, straight into its month file: a month partition cannot name a day), refresh
# the coverage grid, trip one strategy's kill switch with the job a person would launch, and
# snapshot the ledger so its metadata shows the new state.
AFTER_DEMO = f"""
import sys
from datetime import date

import dagster as dg
from candlestack.ingest import Ingestor
from pipelines.definitions import defs, settings

source, lake = defs.resources["source"].open(), defs.resources["lake"].lake
for symbol in settings.symbols:
    Ingestor(source, lake).ingest(symbol, [date.fromisoformat(sys.argv[1])])
trip = {{"action": "trip", "scope": "btc_scalp", "reason": {TRIP_REASON!r}}}
for job, config in (
    ("refresh_catalog", {{}}),
    ("kill_switch", {{"ops": {{"change_kill_switch": {{"config": trip}}}}}}),
    ("dry_run_checks", {{}}),
):
    result = defs.resolve_job_def(job).execute_in_process(
        instance=dg.DagsterInstance.get(), run_config=config
    )
    assert result.success, job
"""
# Each lineage edge as [from, to] asset names: an edge's two ends are matched to the nearest
# asset node of the rendered graph (null when no node is within 30 px of an end).
EDGES_JS = """
const svg = document.querySelector('svg[class*="sVGContainer"]');
const nodes = [...svg.querySelectorAll('foreignObject')].flatMap(fo => {
  const name = fo.querySelector('[class*="AssetNode_assetName"]');
  if (!name) return [];
  const [x, y, w, h] = ['x', 'y', 'width', 'height'].map(a => fo[a].baseVal.value);
  return [{name: name.textContent.trim(), x, y, w, h}];
});
const gap = (p, n) => Math.hypot(
  Math.max(n.x - p.x, 0, p.x - n.x - n.w), Math.max(n.y - p.y, 0, p.y - n.y - n.h));
const owner = p => {
  const near = nodes.filter(n => gap(p, n) < 30).sort((a, b) => gap(p, a) - gap(p, b));
  return near.length ? near[0].name : null;
};
return [...svg.querySelectorAll('path[marker-end]')].map(path => [
  owner(path.getPointAtLength(0)), owner(path.getPointAtLength(path.getTotalLength())),
]);
"""


def run(env: dict, *args) -> None:
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{args[1]}: {done.stdout[-2000:]}\n{done.stderr[-3000:]}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serves_assets(url: str) -> bool:
    """The webserver answers GraphQL and its code location has loaded."""
    query = json.dumps({"query": "{ assetNodes { assetKey { path } } }"}).encode()
    request = urllib.request.Request(
        f"{url}/graphql", data=query, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as answer:
            return b'"candles_1m"' in answer.read()
    except OSError:
        return False


@dataclass(frozen=True)
class DemoUI:
    url: str
    days: list[date]  # the stored days: the first, then the demo's
    gap_day: date  # no candles at all, between days that have them
    months: list[date]  # the month partitions: from two months before the demo's first


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    """One demo lake and one `dagster dev` for every view."""
    tmp = tmp_path_factory.mktemp("ui")
    # Partitions from two months before the demo's: those months stay missing (grey).
    month = (datetime.now(UTC).date() - timedelta(days=7)).replace(day=1)
    start = (month - timedelta(days=40)).replace(day=1)
    env = isolated_env(tmp, start_date=start.isoformat())
    # The first visit's newsletter dialog would cover the page.
    (Path(env["DAGSTER_HOME"]) / ".nux").mkdir()
    (Path(env["DAGSTER_HOME"]) / ".nux" / "nux.yaml").write_text("seen: 1\n")
    run(env, BIN / "python", "-m", "pipelines.demo")
    # The days come from what the demo wrote, not from the clock: a run across midnight UTC
    # moves nothing. Two days before the demo's first, one is stored and the other left
    # empty: the gap day.
    demo_days = sorted(
        Lake(env["CANDLESTACK_LAKE"]).day_reports("ohlcv", "synthetic", "1m", "BTC-USDT")
    )
    first, gap_day = demo_days[0] - timedelta(days=2), demo_days[0] - timedelta(days=1)
    run(env, BIN / "python", "-c", AFTER_DEMO, first.isoformat())
    months = [start]
    while months[-1] < month_of(demo_days[-1]):
        months.append((months[-1] + timedelta(days=32)).replace(day=1))

    port = str(free_port())
    url = f"http://127.0.0.1:{port}"
    log = tmp / "dagster_dev.log"
    with open(log, "w") as out:
        server = subprocess.Popen(
            [BIN / "dagster", "dev", "-h", "127.0.0.1", "-p", port, "-w", "workspace.yaml"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 180
        while not serves_assets(url):
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"dagster dev serves no assets:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        yield DemoUI(url, [first, *demo_days], gap_day, months)
    finally:
        # This server's process group only: other dagster processes may share the machine.
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


@pytest.fixture(scope="module")
def browser():
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and chromedriver):
        pytest.fail(
            "Debian's chromium and chromedriver are needed: `make browser`, or "
            "apt-get install chromium chromium-driver"
        )
    options = webdriver.ChromeOptions()
    # Both paths given: Selenium Manager, which would download a browser, is never run.
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    options.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    # A screenshot left by an earlier run must not stand in for one this run failed to take.
    shutil.rmtree(SCREENSHOTS, ignore_errors=True)
    SCREENSHOTS.mkdir(parents=True)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def view(
    driver, url: str, screenshot: str, *texts: str, ready=None, focus: str = "", reload=True
) -> str:
    """Open url (unless `reload` is False: the page as it is), wait until every text is
    rendered and `ready(driver)` holds, scroll the element whose text is `focus` into sight,
    save the screenshot; return the page's text."""
    if reload:
        driver.get(url)

    def rendered(d) -> bool:
        body = d.find_element(By.TAG_NAME, "body").text
        return all(t in body for t in texts) and (ready is None or ready(d))

    try:
        WebDriverWait(driver, WAIT_S).until(rendered)
        if focus:
            target = driver.find_element(By.XPATH, f"//*[normalize-space(text())='{focus}']")
            driver.execute_script("arguments[0].scrollIntoView({block: 'start'})", target)
    except TimeoutException:
        body = driver.find_element(By.TAG_NAME, "body").text
        missing = [t for t in texts if t not in body]
        pytest.fail(f"{url}: not rendered within {WAIT_S} s: {missing or 'ready'}\n{body[:3000]}")
    finally:
        path = SCREENSHOTS / screenshot
        driver.save_screenshot(str(path))
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"no screenshot {path}"
    return driver.find_element(By.TAG_NAME, "body").text


def edges(driver) -> set[tuple[str, str]]:
    return {tuple(edge) for edge in driver.execute_script(EDGES_JS)}


def graph_drawn(driver) -> bool:
    """Edges are drawn and every node has loaded its status."""
    graph = driver.find_elements(By.CSS_SELECTOR, 'svg[class*="sVGContainer"]')
    return bool(
        graph
        and graph[0].find_elements(By.CSS_SELECTOR, "path[marker-end]")
        and "Loading" not in graph[0].get_attribute("textContent")
    )


def lineage(url: str, asset: str, depth: int) -> str:
    return f"{url}/assets/{asset}?view=lineage&lineageScope=upstream&lineageDepth={depth}"


def test_asset_graph_shows_lineage_from_candles_to_backtests_and_dry_run(browser, ui):
    groups = ("market_data", "bars", "features", "backtests", "dry_run")
    view(browser, f"{ui.url}/asset-groups", "asset_graph.png", "Global asset lineage", *groups)

    chain = ("candles_1m", "bars_5m", "backtest_btc_ma_cross", "dryrun_btc_ma_cross")
    view(browser, lineage(ui.url, chain[-1], 99), "lineage_dryrun.png", *chain, ready=graph_drawn)
    drawn = edges(browser)
    assert {
        ("candles_1m", "bars_5m"),
        ("bars_5m", "backtest_btc_ma_cross"),
        ("backtest_btc_ma_cross", "dryrun_btc_ma_cross"),
        ("bars_5m", "dryrun_btc_ma_cross"),
        ("markets", "dryrun_btc_ma_cross"),
    } <= drawn, drawn

    dry_runs = [f"dryrun_{s}" for s in ("btc_ma_cross", "btc_mean_reversion", "btc_scalp")]
    view(
        browser,
        lineage(ui.url, "ledger", 1),
        "lineage_ledger.png",
        "ledger",
        *dry_runs,
        ready=graph_drawn,
    )
    drawn = edges(browser)
    assert {(name, "ledger") for name in dry_runs} <= drawn, drawn


def partition_url(url: str, month: date, symbol: str) -> str:
    return f"{url}/assets/candles_1m?view=partitions&partition={month.isoformat()}%7C{symbol}"


def status_dot(driver, label: str) -> str:
    """The style of the status dot beside a month or symbol in the partitions lists."""
    dot = driver.find_element(By.XPATH, f"//div[@data-tooltip='{label}']/following-sibling::div[1]")
    return dot.get_attribute("style")


def test_candle_partitions_are_months_by_symbol_with_a_per_day_table(browser, ui):
    complete = ui.days[-2]  # the demo's last closed day
    demo_months = sorted({month_of(d) for d in ui.days[1:]})  # the first is not the demo's
    month = month_of(complete)
    text = view(
        browser,
        partition_url(ui.url, month, "BTC-USDT"),
        "partitions_month.png",
        f"{month.isoformat()}|BTC-USDT",
        "Materialized",
        "gaps_check",
        "per_day",
        focus="first_ts",
        ready=lambda d: "accent" in status_dot(d, month.isoformat()),
    )
    # The month partition's own figures, as the asset recorded them for that month and symbol.
    assert re.search(r"\ngaps_check\npassed\n", text), text
    assert re.search(r"\nquality\n(complete|imputed)\n", text), text
    assert re.search(r"\nmissing\n0\n", text), text
    # Every month of the partitions: the demo's are materialized, the ones before are not.
    dots = {m: status_dot(browser, m.isoformat()) for m in ui.months}
    assert all("accent-green" in dots[m] for m in demo_months), dots
    missing = [m for m in ui.months if m not in demo_months]
    assert missing and all("accent-gray" in dots[m] for m in missing), dots
    assert f"Materialized ({len(SYMBOLS) * len(demo_months)})" in text
    assert f"Missing ({len(SYMBOLS) * len(missing)})" in text
    assert "Failed (0)" in text


def strip_mark(text: str, symbol: str, day: date) -> str:
    """The mark of one day in the coverage strips: one line per symbol and month, day 1 first."""
    line = re.search(rf"^{symbol}\s+{day:%Y-%m} (.*)$", text, re.MULTILINE)
    assert line, (symbol, day, text)
    return line[1][day.day - 1 : day.day]


def test_the_coverage_grid_shows_each_day_and_the_gap_day(browser, ui):
    text = view(
        browser,
        f"{ui.url}/assets/candle_coverage",
        "coverage_months.png",
        "recent_days",
        "· absent",
    )
    # The strip of every day of the lake, one line per symbol and month, one mark a day: the
    # first day is stored, the gap day after it is absent (·).
    for symbol in SYMBOLS:
        assert strip_mark(text, symbol, ui.days[0]) in "█▓▒░", (symbol, text)
        assert strip_mark(text, symbol, ui.gap_day) == "·", (symbol, text)
    # The grid of the last 31 days, one row per day and a cell per symbol. Dagster shows a
    # long one behind a link, in a dialog (recent_days is the first markdown entry).
    newest = ui.days[-1]
    links = browser.find_elements(By.XPATH, "//*[normalize-space(text())='[Show Markdown]']")
    if links:
        browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", links[0])
        links[0].click()
        text = view(browser, "", "coverage_days.png", newest.isoformat(), "open", reload=False)
    # The synthetic source imputes a few minutes a day: under 1 %, the lightest grade.
    cell = r"[\s|]+(✅ complete|🟨 imputed \d+\.\d % \(\d+ min\))"
    recent = [d for d in ui.days[:-1] if (newest - d).days < 31]
    assert recent  # every closed day stored; the newest is today's, open
    for day in recent:
        assert re.search(rf"{day.isoformat()}{cell}{cell}{cell}", text), (day, text)
    if (newest - ui.gap_day).days < 31:
        assert re.search(rf"{ui.gap_day.isoformat()}([\s|]+· absent){{3}}", text), text
    assert re.search(rf"{newest.isoformat()}([\s|]+⏳ open){{3}}", text), text


def check_url(url: str, asset: str, check: str) -> str:
    return f"{url}/assets/{asset}?view=checks&checkDetail={check}"


def test_check_results_show_gaps_drift_and_audit_with_their_metadata(browser, ui):
    text = view(
        browser,
        check_url(ui.url, "candles_1m", "gaps"),
        "check_gaps.png",
        "days_checked",
        "imputed_max_share",
    )
    assert re.search(r"Evaluation result\nPassed", text), text
    for figure in ("missing_minutes 0", "days_failed 0", "imputed_max_share 0.01"):
        assert figure in text
    assert re.search(r"days_checked \d+", text), text

    text = view(
        browser,
        check_url(ui.url, "dryrun_btc_ma_cross", "drift"),
        "check_drift.png",
        "within tolerance",
        "signal_agreement",
        "fill_price_diff_bps_max",
    )
    assert re.search(r"Evaluation result\nPassed", text), text
    for figure in ("signal_agreement 1", "unmatched_fills 0", "pnl_diff 0"):
        assert figure in text

    text = view(
        browser,
        check_url(ui.url, "ledger", "audit_chain"),
        "check_audit_chain.png",
        "events verified",
        "head_hash",
        "problems 0",
    )
    assert re.search(r"Evaluation result\nPassed", text), text
    assert re.search(r"\nevents (\d+)\n", text), text
    assert re.search(r"head_hash [0-9a-f]{64}", text), text


def test_automation_lists_the_sensors_and_the_schedules(browser, ui):
    schedules = (
        "keep_open_day_current",
        "finalise_yesterday",
        "snapshot_markets_daily",
        "refresh_catalog_schedule",
        "backtests_daily",
        "dry_run_checks_every_15_minutes",
    )
    shown = (
        r"dry_run_bars\nStandard sensor",
        r"stuck_runs\nStandard sensor",
        r"keep_open_day_current\nScheduled Every minute",
        r"dry_run_checks_every_15_minutes\nScheduled Every 15 minutes",
    )

    def rows_described(driver) -> bool:
        # Each row's kind and timing render after its name.
        body = driver.find_element(By.TAG_NAME, "body").text
        return all(re.search(pattern, body) for pattern in shown)

    text = view(
        browser,
        f"{ui.url}/automation",
        "automation.png",
        "dry_run_bars",
        "stuck_runs",
        *schedules,
        ready=rows_described,
    )
    assert all(re.search(pattern, text) for pattern in shown), text

    view(
        browser,
        f"{ui.url}/locations/candlestack/sensors/dry_run_bars",
        "sensor_dry_run_bars.png",
        "dry_run_bars",
        "Requests a dry-run of each enabled strategy",
        "Target\ndry_run",
    )


def test_kill_switch_state_shows_on_the_ledger(browser, ui):
    text = view(
        browser,
        f"{ui.url}/assets/ledger",
        "kill_switch.png",
        "kill_switch",
        "scope state last change",
        TRIP_REASON,
        focus="kill_switch",
    )
    assert re.search(rf"\nbtc_scalp TRIPPED {re.escape(TRIP_REASON)} \(dagster run ", text), text
    for strategy in ("btc_ma_cross", "btc_mean_reversion", "eth_breakout"):
        assert re.search(rf"\n{strategy} armed\n", text), text
