"""The playground page in a real headless browser (Debian's chromium, driven by Playwright)."""

import shutil
from pathlib import Path

import httpx
import pytest

from test_server import KEY, Server

ROOT = Path(__file__).resolve().parents[1]
ART = ROOT / ".cache" / "artifacts" / "playground"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PROMPT = "The patient fever biopsy dose tumor"


@pytest.fixture(scope="module")
def srv(built):
    from index_store.loader import load_constellation

    loaded = load_constellation(built("llama", domains=("medical", "legal", "code", "science"),
                                      everywhere=("science",)))
    s = Server(loaded)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), "Debian's chromium is needed (make setup installs it: apt-get install chromium)"
    ART.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield b
        b.close()


def _page(browser, srv, width=1100):
    ctx = browser.new_context(viewport={"width": width, "height": 900})
    page = ctx.new_page()
    external = []
    page.on("request", lambda r: None if r.url.startswith(srv.url) else external.append(r.url))
    page.goto(srv.url + "/")
    page.wait_for_selector("#mode option", state="attached")
    return ctx, page, external


def test_static_files_are_open_but_every_call_needs_the_key(srv):
    assert httpx.get(srv.url + "/").status_code == 200
    assert httpx.get(srv.url + "/ui/app.js").status_code == 200
    assert httpx.get(srv.url + "/ui/nope.js").status_code == 404
    assert httpx.get(srv.url + "/index").status_code == 401
    assert httpx.get(srv.url + "/index", headers={"Authorization": f"Bearer {KEY}"}).json()["domains"]


def test_wrong_key_shows_a_readable_401_then_streams_with_the_right_key(browser, srv):
    ctx, page, external = _page(browser, srv)
    page.fill("#prompt", PROMPT)
    page.click("#run")
    page.wait_for_selector("#error:not([hidden])")
    assert page.get_attribute("#error", "data-status") == "401"
    assert "API key" in page.text_content("#error")
    assert page.is_visible("#key-box")
    page.screenshot(path=str(ART / "1-401-asks-for-key.png"), full_page=True)
    assert not page.is_visible("#weights-box")  # only shown for mode "weights"
    for tab in ("#tab-play", "#tab-index"):  # tab labels readable: text colour is not the background's
        color, bg = page.eval_on_selector(tab, "e => [getComputedStyle(e).color, getComputedStyle(document.body).backgroundColor]")
        assert color != bg and color != "rgb(255, 255, 255)", (tab, color)

    page.fill("#api-key", "wrong-key")
    page.click("#save-key")
    page.click("#run")
    page.wait_for_selector("#error:not([hidden])")
    assert page.get_attribute("#error", "data-status") == "401"

    page.fill("#api-key", KEY)
    page.click("#save-key")
    assert not page.is_visible("#key-box")
    assert page.evaluate("sessionStorage.getItem('constellation.apiKey')") == KEY
    page.select_option("#mode", "constellation")
    page.click("#run")
    page.wait_for_function("document.querySelector('#pane-a').dataset.done === 'true'")
    text = page.text_content("#pane-a .answer")
    assert text, "no streamed text"
    assert "TTFT" in page.text_content("#pane-a .stats")
    # one bar per domain, with exactly /explain's alpha
    bars = page.eval_on_selector_all("#bars .bar", "els => els.map(e => [e.dataset.domain, e.dataset.alpha])")
    doc = httpx.post(srv.url + "/explain", headers={"Authorization": f"Bearer {KEY}"},
                     json={"messages": [{"role": "user", "content": PROMPT}], "composition": {"mode": "constellation"},
                           "include_node_weights": True}).json()
    assert [d for d, _ in bars] == doc["domains"]
    for d, a in bars:
        assert float(a) == pytest.approx(doc["alpha"][d], abs=1e-12)
    assert page.locator("#heat canvas").count() == len(doc["selected"])
    assert "entropy" in page.text_content("#comp-summary")
    page.screenshot(path=str(ART / "2-streamed-with-composition.png"), full_page=True)
    assert not external, external
    ctx.close()


def test_side_by_side_and_completion_mode(browser, srv):
    ctx, page, _ = _page(browser, srv)
    page.evaluate(f"sessionStorage.setItem('constellation.apiKey', '{KEY}')")
    page.fill("#prompt", PROMPT)
    page.check("input[value=completion]")
    page.select_option("#mode", "constellation")
    page.select_option("#compare", "generalist")
    page.click("#side")
    page.wait_for_function("document.querySelector('#pane-a').dataset.done === 'true' && "
                           "document.querySelector('#pane-b').dataset.done === 'true'")
    assert page.is_visible("#pane-b")
    assert page.text_content("#pane-a .pane-mode") == "constellation"
    assert page.text_content("#pane-b .pane-mode") == "generalist"
    assert page.text_content("#pane-a .answer") and page.text_content("#pane-b .answer")
    page.screenshot(path=str(ART / "3-side-by-side.png"), full_page=True)
    # weights mode shows the per-domain inputs
    page.select_option("#mode", "weights")
    assert page.is_visible("#weights-box")
    ctx.close()


def test_index_tab_keyboard_and_narrow_screen(browser, srv):
    ctx, page, _ = _page(browser, srv, width=375)
    page.evaluate(f"sessionStorage.setItem('constellation.apiKey', '{KEY}')")
    assert page.evaluate("document.documentElement.scrollWidth") <= 375  # readable at 375 px, no sideways scroll
    page.focus("#tab-play")
    page.keyboard.press("ArrowRight")
    page.wait_for_selector("#collinearity")
    assert page.evaluate("document.activeElement.id") == "tab-index"
    assert "Recommendation" in page.text_content("#index-doc")
    page.screenshot(path=str(ART / "4-index-diagnostics-375px.png"), full_page=True)
    page.keyboard.press("ArrowLeft")
    page.focus("#prompt")
    page.keyboard.type(PROMPT)
    page.keyboard.press("Tab")  # to the first radio
    page.focus("#run")
    page.keyboard.press("Enter")
    page.wait_for_function("document.querySelector('#pane-a').dataset.done === 'true'")
    assert page.evaluate("document.documentElement.scrollWidth") <= 375  # long output wraps
    for el in page.query_selector_all("input:not([type=radio]), select, textarea"):  # every control is labelled
        el_id = el.get_attribute("id")
        assert page.locator(f"label[for='{el_id}']").count() == 1, el_id
    page.screenshot(path=str(ART / "5-streamed-375px.png"), full_page=True)
    ctx.close()
