"""The browser tests' fixtures: one headless Chromium per module (Debian's, through its chromedriver), a fresh
page per test, a screenshot of every test in its tmp dir and no console error allowed.

The explicit binary and driver paths keep Selenium Manager (which would go to the network to look for a
browser) out of the way; ``--no-sandbox`` is needed as root and ``--headless=new`` for a display-less run.
Tests wait with :meth:`Page.wait_for` (WebDriverWait with a deadline), never with sleeps.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional

import pytest

from tests.servers import free_port

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
         "--window-size=1400,1000")

pytestmark = pytest.mark.browser


def _missing() -> Optional[str]:
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            return f"{path} is absent (apt-get install chromium chromium-driver; scripts/ensure-system-deps.sh does)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    return None


def pytest_collection_modifyitems(items: List[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.browser)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A headless Chromium driven by Selenium, shared by the module's tests (a launch costs seconds)."""
    reason = _missing()
    if reason:
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_AVOID_STATS"] = "true"
    profile = tmp_path_factory.mktemp("chromium-profile")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.add_argument(f"--remote-debugging-port={free_port()}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(CHROMEDRIVER, port=free_port(), log_output=str(profile.parent / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(20)
    driver.set_script_timeout(10)
    try:
        yield driver
    finally:
        driver.quit()


class Page:
    """One test's view of the shared browser: waits, hooks by data-testid, the console's errors."""

    def __init__(self, driver: Any, directory: Path) -> None:
        self.driver = driver
        self.directory = directory
        self._allowed: List[re.Pattern] = []
        self.finished: Optional[List[dict]] = None   # the console's SEVERE lines, once finish() ran

    def open(self, url: str) -> None:
        self.driver.get(url)

    def allow_console(self, pattern: str) -> None:
        """A SEVERE console line matching ``pattern`` is expected (a refused request the test makes happen)."""
        self._allowed.append(re.compile(pattern))

    def wait_for(self, predicate: Callable[[Any], Any], timeout: float = 10.0, what: str = "condition") -> Any:
        from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
        from selenium.webdriver.support.ui import WebDriverWait

        wait = WebDriverWait(self.driver, timeout, poll_frequency=0.1,
                             ignored_exceptions=(StaleElementReferenceException,))

        def attempt(driver: Any) -> Any:
            try:
                return predicate(driver)
            except (LookupError, ValueError, TypeError, WebDriverException):
                return False
        try:
            return wait.until(attempt)
        except Exception as err:  # TimeoutException: say what was waited for
            raise AssertionError(f"timed out after {timeout}s waiting for {what}") from err

    def find(self, css: str) -> Any:
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.CSS_SELECTOR, css)

    def find_all(self, css: str) -> List[Any]:
        from selenium.webdriver.common.by import By

        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def testid(self, name: str) -> Any:
        return self.find(f'[data-testid="{name}"]')

    def text(self, name: str) -> str:
        return self.testid(name).text

    def value(self, name: str) -> str:
        """The raw value behind an overview figure (its data-value)."""
        return self.testid(name).get_attribute("data-value") or ""

    def body(self, attribute: str) -> str:
        return self.find("body").get_attribute(attribute) or ""

    def polls(self) -> int:
        return int(self.body("data-polls") or 0)

    def wait_polls(self, count: int = 1, timeout: float = 10.0) -> None:
        """Until ``count`` more good polls have been drawn."""
        start = self.polls()
        self.wait_for(lambda d: self.polls() >= start + count, timeout, f"{count} more poll(s)")

    def type_into(self, name: str, text: str) -> None:
        field = self.testid(name)
        field.clear()
        field.send_keys(text)

    def posts(self) -> int:
        """How many POSTs the page has sent since it was loaded."""
        return int(self.body("data-posts") or 0)

    def screenshot(self, path: Path, full: bool = True) -> None:
        """A PNG of the page; ``full``: the whole document, not only the window."""
        size = self.driver.get_window_size()
        if full:
            height = self.driver.execute_script("return document.documentElement.scrollHeight")
            self.driver.set_window_size(size["width"], max(size["height"], min(int(height) + 120, 8000)))
        try:
            self.driver.save_screenshot(str(path))
        finally:
            if full:
                self.driver.set_window_size(size["width"], size["height"])

    def finish(self) -> None:
        """Once: the screenshot (page.png in the test's tmp dir), the console's errors, then about:blank so
        that the page stops polling before the test's servers go away."""
        if self.finished is not None:
            return
        try:
            self.screenshot(self.directory / "page.png")
        except Exception as err:  # noqa: BLE001 - a screenshot must not hide the test's own outcome
            print(f"no screenshot: {err}")
        self.finished = self.severe()
        self.driver.get("about:blank")

    def severe(self) -> List[dict]:
        entries = self.driver.get_log("browser")
        return [e for e in entries if e.get("level") == "SEVERE"
                and not any(p.search(e.get("message", "")) for p in self._allowed)]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """Right after the test body (before any fixture stops the servers the page polls): screenshot, console."""
    yield
    view = getattr(item, "funcargs", {}).get("page")
    if isinstance(view, Page):
        view.finish()


@pytest.fixture
def page(browser: Any, tmp_path: Path) -> Iterator[Page]:
    """A fresh page (about:blank, console drained); after the test: a screenshot (page.png in the test's tmp
    dir), then no SEVERE console line but those the test allowed."""
    browser.get("about:blank")
    browser.get_log("browser")
    view = Page(browser, tmp_path)
    yield view
    view.finish()
    assert not view.finished, f"browser console errors: {view.finished}"
