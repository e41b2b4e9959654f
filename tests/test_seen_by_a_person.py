"""Seen by a person: headless Chromium looks at a preview the way a reviewer does.

A preview runs to ready on a real local instance; Chromium opens the app through the Session
Manager tunnel (its own page, then FastAPI's /docs) and the run in the Prefect UI (the PR
comment's link, its Task Runs tab, wait-ready's page). Each page is saved as a screenshot under
``build/screenshots/``.

The browser is Debian's ``chromium`` (``make`` installs it), driven by Playwright; it may reach
127.0.0.1 only, so a page that wants the internet shows what a reviewer on a closed network
would see.
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit
from uuid import UUID

import httpx
import pytest
from playwright.sync_api import BrowserContext, Locator, Page, Route, expect, sync_playwright
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.settings import PREFECT_API_URL

from flows.preview import pr_preview
from local_stack.serve import serve_asgi
from tests import test_failure_table
from tests.test_failure_table import REPO, SHA1, World
from tests.test_instance_runtime import port_forwarding

# The failure table's healthy world, and the db-server it stands on, as this module's fixtures.
database = test_failure_table.database
published = test_failure_table.published
world = test_failure_table.world

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    # Without these Chromium dials Google's services and the closed network refuses it.
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOTS = Path(__file__).resolve().parents[1] / "build" / "screenshots"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# The steps a reviewer looks for on the run's page, as its Task Runs tab names them.
# A new preview migrates on boot; wait-ready probes its app in the same command.
STEPS = ("launch", "wait-ready", "confirm-ttl")
SECONDS = 1000  # Playwright counts milliseconds
DRAWN_PNG_BYTES = 8000


class Browser:
    """A Chromium profile of the test's own that reaches nothing but 127.0.0.1."""

    def __init__(self, context: BrowserContext, screenshots: Path) -> None:
        self.context, self.screenshots = context, screenshots
        self.blocked: list[str] = []
        context.route("**/*", self._loopback_only)

    def _loopback_only(self, route: Route) -> None:
        if urlsplit(route.request.url).hostname in ("127.0.0.1", "localhost"):
            route.continue_()
        else:
            self.blocked.append(route.request.url)
            route.abort("internetdisconnected")

    def screenshot(self, page: Page, name: str) -> None:
        page.screenshot(path=self.screenshots / f"{name}.png")


@contextmanager
def chromium(tmp_path: Path) -> Iterator[Browser]:
    """Debian's chromium under Playwright (no `playwright install`: nothing is downloaded).

    Opened only once the flow has run: Playwright's sync API installs an event loop in this
    thread, and Prefect's sync calls made under it would return coroutines."""
    screenshots = tmp_path / "screenshots"
    screenshots.mkdir()
    expect.set_options(timeout=30 * SECONDS)  # the UI renders slowly on a busy machine
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            tmp_path / "chromium-profile",
            executable_path=CHROMIUM,
            args=CHROMIUM_ARGS,
            headless=True,
            viewport={"width": 1280, "height": 800},
        )
        try:
            yield Browser(context, screenshots)
        finally:
            context.close()


@pytest.fixture
def prefect_ui(prefect_server: None) -> Iterator[str]:
    """The Prefect UI of the test server, served from this process.

    ``prefect_test_harness`` starts its server with ``PREFECT_UI_ENABLED=0``: it answers the
    API only. The UI is static files plus ``/ui-settings`` (which names the API), so the
    server's own UI app is served here on a port of its own, pointing at the harness's API,
    which allows any origin (CORS)."""
    from prefect.server.api.server import create_ui_app

    with serve_asgi(create_ui_app(ephemeral=False)) as url:
        settings = httpx.get(f"{url}/ui-settings", timeout=10).json()
        assert settings["api_url"] == PREFECT_API_URL.value(), settings
        yield url


def wait_until_recorded(flow_run_id: UUID, logs: list[str], timeout: float = 30) -> int:
    """Until the server holds every task run of the run as Completed, and each of ``logs``:
    task-run states and logs reach it in batches, after the flow has returned. Returns the
    number of task runs."""
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            )
            messages = "\n".join(
                log.message
                for log in client.read_logs(
                    LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
                )
            )
            steps = {run.name.rsplit("-", 1)[0] for run in runs}
            if (
                set(STEPS) <= steps
                and all(run.state_name == "Completed" for run in runs)
                and all(line in messages for line in logs)
            ):
                return len(runs)
            assert time.monotonic() < deadline, f"not recorded: {sorted(steps)} {logs}"
            time.sleep(0.1)


def wait_until_drawn(canvas: Locator, timeout: float = 30) -> None:
    """Until the run graph is drawn. It is a WebGL canvas, with no DOM to wait on: blank, it is
    one flat colour, whose PNG is about 2 kB."""
    deadline = time.monotonic() + timeout
    while len(canvas.screenshot()) < DRAWN_PNG_BYTES:
        assert time.monotonic() < deadline, "the run graph was not drawn"
        time.sleep(0.1)


def test_a_reviewer_sees_the_preview_and_its_run(
    world: World, prefect_ui: str, tmp_path: Path
) -> None:
    state = pr_preview(REPO, 42, SHA1, action="opened", config=world.config, return_state=True)
    result = state.result()
    assert result.status == "ready", state.message
    instance = result.instance_id
    assert instance is not None
    run_id: UUID = state.state_details.flow_run_id  # type: ignore[assignment]
    run_name = f"pr-42-{SHA1[:7]}"
    began = f"Beginning flow run '{run_name}' for flow 'pr-preview'"
    probed = "migrated on boot; /healthz answered 200"
    task_runs = wait_until_recorded(run_id, [began, probed])

    with chromium(tmp_path) as browser:
        page = browser.context.new_page()
        with port_forwarding(world.runtime, instance) as tunnel:
            # The app's own page: which build runs.
            page.goto(tunnel)
            expect(page).to_have_title("hello-api")
            expect(page.get_by_role("heading", level=1)).to_have_text("hello-api")
            expect(page.locator("#version")).to_have_text("v1")
            expect(page.locator("#sha")).to_have_text(SHA1)
            expect(page.locator("body")).to_contain_text(f"version v1, running {SHA1}")
            browser.screenshot(page, "1-preview-index")

            # /docs, where the PR comment sends the reviewer. FastAPI's Swagger UI loads its
            # script and stylesheet from a CDN, out of reach here: the page has its title and
            # an empty body. The document it would render names the app and its routes.
            page.goto(f"{tunnel}docs")
            expect(page).to_have_title("hello-api - Swagger UI")
            expect(page.locator("#swagger-ui")).to_be_empty()
            assert any(
                url.startswith("https://cdn.jsdelivr.net/") and url.endswith("/swagger-ui.css")
                for url in browser.blocked
            ), browser.blocked
            assert any(url.endswith("/swagger-ui-bundle.js") for url in browser.blocked)
            openapi = page.request.get(f"{tunnel}openapi.json").json()
            assert (openapi["info"]["title"], openapi["info"]["version"]) == ("hello-api", "v1")
            assert {"/", "/healthz"} <= set(openapi["paths"])
            browser.screenshot(page, "2-preview-docs")

        # The run's page in the Prefect UI, the PR comment's link: name, state, graph, logs.
        page.goto(f"{prefect_ui}/runs/flow-run/{run_id}")
        heading = page.locator(".page-heading")
        expect(heading.locator(".p-bread-crumbs__crumb").last).to_have_text(run_name)
        expect(heading.locator(".state-badge")).to_have_text("Completed")
        expect(heading).to_contain_text(f"{task_runs} Task runs")
        expect(page.locator(".flow-run-logs")).to_contain_text(began)
        wait_until_drawn(page.locator(".flow-run-graph canvas"))
        browser.screenshot(page, "3-prefect-flow-run")

        # Its Task Runs tab: each step a reviewer looks for, Completed.
        page.get_by_role("tablist").get_by_text("Task Runs", exact=True).click()
        for step in STEPS:
            row = page.locator(".state-list-item").filter(
                has=page.get_by_role("link", name=re.compile(rf"^{step}-\w+$"))
            )
            expect(row.locator(".state-badge")).to_have_text("Completed")
            row.scroll_into_view_if_needed()  # the screenshot shows the rows asserted
        browser.screenshot(page, "4-prefect-task-runs")

        # wait-ready's own page: the instance migrated on boot and its app answered.
        page.get_by_role("link", name=re.compile(r"^wait-ready-\w+$")).click()
        expect(page).to_have_url(re.compile(r"/runs/task-run/[0-9a-f-]+"))
        expect(page.locator(".page-heading .state-badge")).to_have_text("Completed")
        expect(page.locator(".logs")).to_contain_text(probed)
        browser.screenshot(page, "5-prefect-wait-ready")

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    shots = sorted(browser.screenshots.iterdir())
    assert [shot.name for shot in shots] == [
        "1-preview-index.png",
        "2-preview-docs.png",
        "3-prefect-flow-run.png",
        "4-prefect-task-runs.png",
        "5-prefect-wait-ready.png",
    ]
    for shot in shots:
        assert shot.read_bytes().startswith(PNG_SIGNATURE) and shot.stat().st_size > 1000, shot
        shutil.copy(shot, SCREENSHOTS / shot.name)
    print(f"screenshots: {browser.screenshots}, copied to {SCREENSHOTS}")
