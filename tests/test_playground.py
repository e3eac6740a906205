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


def _explain(srv, mode, weights=None, kind="chat"):
    """The reference document the page's composition panel must show."""
    comp = {"mode": mode}
    if weights:
        comp["weights"] = weights
    req = {"composition": comp, "include_node_weights": True}
    if kind == "chat":
        req["messages"] = [{"role": "user", "content": PROMPT}]
    else:
        req["prompt"] = PROMPT
    r = httpx.post(srv.url + "/explain", headers={"Authorization": f"Bearer {KEY}"}, json=req)
    assert r.status_code == 200, r.text
    return r.json()


def _bars(page, panel):
    return page.eval_on_selector_all(
        f"{panel} .bar", "els => els.map(e => [e.dataset.domain, e.dataset.alpha, e.dataset.weight, "
        "e.querySelector('.wv').textContent, parseFloat(e.querySelector('.track.w .fill').style.width)])")


def _with_key(browser, srv, width=1100):
    ctx, page, external = _page(browser, srv, width)
    page.evaluate(f"sessionStorage.setItem('constellation.apiKey', '{KEY}')")
    page.fill("#prompt", PROMPT)
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
    page.wait_for_function("document.querySelector('#comp-a').dataset.done === 'true'")
    bars = _bars(page, "#comp-a")
    doc = _explain(srv, "constellation")
    assert [b[0] for b in bars] == doc["domains"]
    for d, a, *_ in bars:
        assert float(a) == pytest.approx(doc["alpha"][d], abs=1e-12)
    assert page.locator("#comp-a .heat canvas").count() == len(doc["selected"])
    assert "entropy" in page.text_content("#comp-a .comp-summary")
    assert not page.is_visible("#comp-b")  # one mode, one composition panel
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
    # one composition panel per side, each from its own mode's /explain
    page.wait_for_function("document.querySelector('#comp-a').dataset.done === 'true' && "
                           "document.querySelector('#comp-b').dataset.done === 'true'")
    assert page.is_visible("#comp-a") and page.is_visible("#comp-b")
    for panel, mode in (("#comp-a", "constellation"), ("#comp-b", "generalist")):
        doc = _explain(srv, mode, kind="completion")
        assert page.text_content(f"{panel} .comp-mode") == mode
        summary = page.text_content(f"{panel} .comp-summary")
        assert f"mode {mode}" in summary and f"selected {', '.join(doc['selected']) or 'none'}" in summary
        assert f"{doc['entropy_bits']:.3f} bits" in summary
        bars = _bars(page, panel)
        assert [b[0] for b in bars] == doc["domains"]
        for d, a, w, *_ in bars:
            assert float(a) == pytest.approx(doc["alpha"][d], abs=1e-12)
            assert float(w) == pytest.approx(doc["mean_node_weight"].get(d, 0.0), abs=1e-9)
        assert page.locator(f"{panel} .heat canvas").count() == len(doc["node_weights"])
    assert page.locator("#comp-b .bar.selected").count() == 0  # the generalist composes no specialist
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
    # the catalog: its version and one row per specialist, as GET /index has them
    doc = httpx.get(srv.url + "/index", headers={"Authorization": f"Bearer {KEY}"}).json()
    # the recommendation beside the mode in force, and what the residual table is (the basis is symmetric)
    assert page.text_content("#default-mode") == doc["default_mode"] == "constellation"
    note = page.text_content("#recommendation")
    assert note == "Recommendation: " + doc["recommendation_note"] and note.count(doc["recommendation"]) >= 1
    assert "Advice only" in note and "[composition].mode, constellation (the default)" in note
    assert doc["basis"] == "symmetric" and page.text_content("#residual-note") == doc["residual_note"]
    assert "does not use them" in doc["residual_note"]
    assert page.text_content("#catalog-version") == str(doc["catalog_version"])
    rows = page.eval_on_selector_all("#specialists tr td:first-child", "els => els.map(e => e.textContent)")
    assert rows == [r["name"] for r in doc["specialists"]] == doc["domains"]
    assert page.evaluate("document.documentElement.scrollWidth") <= 375  # long paths wrap
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


def test_weights_mode_bars_show_the_weights_used_not_alpha(browser, srv):
    ctx, page, _ = _with_key(browser, srv)
    page.select_option("#mode", "weights")
    page.fill("#w-medical", "1")
    page.fill("#w-legal", "0.5")
    page.click("#run")
    page.wait_for_function("document.querySelector('#comp-a').dataset.done === 'true' && "
                           "document.querySelector('#pane-a').dataset.done === 'true'")
    doc = _explain(srv, "weights", {"medical": 1.0, "legal": 0.5})
    used = doc["mean_node_weight"]
    assert set(used) == {"medical", "legal"} == set(doc["selected"])
    bars = {b[0]: b[1:] for b in _bars(page, "#comp-a")}
    assert list(bars) == doc["domains"]
    for d, (a, w, shown, width) in bars.items():
        assert float(a) == pytest.approx(doc["alpha"][d], abs=1e-12)  # alpha still reported, beside
        assert float(w) == pytest.approx(used.get(d, 0.0), abs=1e-9)  # the bar is the weight used
        assert shown == f"{used.get(d, 0.0):.3f}"
        assert width == pytest.approx(100 * used.get(d, 0.0), abs=1e-3)  # weights on a 0..1 scale
    # the bars differ from what alpha alone would draw (the old page drew alpha for every mode)
    assert any(abs(float(w) - float(a)) > 1e-3 for a, w, *_ in bars.values())
    assert bars["code"][1] == "0" and bars["science"][1] == "0"  # weight 0 asked, weight 0 used
    assert "requested medical 1, legal 0.5" in page.text_content("#comp-a .comp-summary")
    page.screenshot(path=str(ART / "6-weights-mode.png"), full_page=True)
    ctx.close()


def test_heat_strips_have_a_scale(browser, srv):
    ctx, page, _ = _with_key(browser, srv)
    page.select_option("#mode", "constellation")
    page.click("#run")
    page.wait_for_function("document.querySelector('#comp-a').dataset.done === 'true'")
    doc = _explain(srv, "constellation")
    values = [v for ws in doc["node_weights"].values() for v in ws]
    scale = page.locator("#comp-a .heat-scale")
    assert scale.count() == 1 and scale.is_visible()
    assert float(scale.get_attribute("data-min")) == pytest.approx(min(values), abs=1e-9)
    assert float(scale.get_attribute("data-max")) == pytest.approx(max(values), abs=1e-9)
    assert page.text_content("#comp-a .heat-scale .min") == f"{min(values):.3f}"
    assert page.text_content("#comp-a .heat-scale .max") == f"{max(values):.3f}"
    text = page.text_content("#comp-a .heat-scale")
    assert "0" in text and "1" in text and "node weight" in text and "unitless" in text
    # the legend's ramp is the strips' colours: white at 0, the accent blue at 1, and a strip's pixel
    # is the ramp's colour for that node's weight
    ends = page.eval_on_selector("#comp-a .heat-scale canvas.ramp", """c => {
        const d = c.getContext('2d').getImageData(0, 0, c.width, 1).data;
        return [Array.from(d.slice(0, 3)), Array.from(d.slice(d.length - 4, d.length - 1))]; }""")
    assert ends == [[255, 255, 255], [36, 86, 199]]
    d0, ws = next(iter(doc["node_weights"].items()))
    j = max(range(len(ws)), key=lambda i: ws[i])
    strip = page.eval_on_selector(f"#comp-a .heat canvas[data-domain='{d0}']",
                                  f"c => Array.from(c.getContext('2d').getImageData({j}, 0, 1, 1).data.slice(0, 3))")
    legend = page.eval_on_selector("#comp-a .heat-scale canvas.ramp",
                                   f"c => Array.from(c.getContext('2d').getImageData(Math.round({ws[j]} * 100), 0, 1, 1)"
                                   ".data.slice(0, 3))")
    assert all(abs(x - y) <= 3 for x, y in zip(strip, legend)), (strip, legend)
    # the min/max marks sit on the ramp at their values
    lo, hi = page.eval_on_selector_all("#comp-a .heat-scale .mark", "ms => ms.map(m => parseFloat(m.style.left))")
    assert lo == pytest.approx(100 * min(values), abs=1e-3) and hi == pytest.approx(100 * max(values), abs=1e-3)
    page.screenshot(path=str(ART / "7-heat-scale.png"), full_page=True)
    ctx.close()


def test_enter_in_the_key_box_saves_the_key_and_reloads(browser, srv):
    ctx, page, _ = _page(browser, srv)
    page.fill("#prompt", PROMPT)
    page.click("#run")
    page.wait_for_selector("#key-box:not([hidden])")
    page.fill("#api-key", KEY)
    page.press("#api-key", "Enter")
    assert not page.is_visible("#key-box")
    assert not page.is_visible("#error")
    assert page.evaluate("sessionStorage.getItem('constellation.apiKey')") == KEY
    page.click("#run")
    page.wait_for_function("document.querySelector('#pane-a').dataset.done === 'true'")
    assert page.text_content("#pane-a .answer")
    ctx.close()

    # on the index tab: the 401 asks for the key there (the box is not inside the hidden playground
    # panel), and Enter loads the diagnostics
    ctx, page, _ = _page(browser, srv)
    page.click("#tab-index")
    page.wait_for_selector("#key-box:not([hidden])")
    assert page.is_visible("#key-box") and page.is_visible("#error")
    page.fill("#api-key", KEY)
    page.press("#api-key", "Enter")
    page.wait_for_selector("#collinearity")
    assert not page.is_visible("#key-box")
    assert page.evaluate("document.activeElement.id") == "tab-index"
    ctx.close()


def test_favicon(browser, srv):
    r = httpx.get(srv.url + "/favicon.ico")  # no key: the page's own files are open
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("image/svg+xml")
    assert r.text.lstrip().startswith("<svg") and "http://" not in r.text.replace("http://www.w3.org/2000/svg", "")
    assert httpx.get(srv.url + "/favicon.ico", headers={"Authorization": "Bearer wrong"}).status_code == 200
    ctx = browser.new_context()
    page = ctx.new_page()
    missing = []
    page.on("response", lambda resp: missing.append(resp.url) if resp.status >= 400 else None)
    page.goto(srv.url + "/")
    page.wait_for_selector("#mode option", state="attached")
    assert page.eval_on_selector("link[rel=icon]", "l => l.getAttribute('href')") == "/favicon.ico"
    ok = page.evaluate("""async () => { const l = document.querySelector('link[rel=icon]');
        const r = await fetch(l.href); return [r.status, r.headers.get('content-type')]; }""")
    assert ok[0] == 200 and ok[1].startswith("image/svg+xml")
    assert not missing, missing
    ctx.close()


def test_json_schema_box_constrains_the_reply(browser, srv):
    import json

    schema = {"type": "object", "properties": {"urgent": {"type": "boolean"}, "level": {"enum": [1, 2, 3]}},
              "required": ["urgent", "level"], "additionalProperties": False}
    ctx, page, _ = _with_key(browser, srv)
    page.fill("#prompt", PROMPT)
    page.click("#schema-box summary")
    page.fill("#schema", "{not json")
    page.click("#run")
    page.wait_for_selector("#error:not([hidden])")
    assert "JSON schema" in page.text_content("#error")
    page.fill("#schema", json.dumps(schema))
    page.click("#run")
    page.wait_for_function("document.querySelector('#pane-a').dataset.done === 'true'")
    reply = json.loads(page.text_content("#pane-a .answer"))
    assert set(reply) == {"urgent", "level"} and reply["level"] in (1, 2, 3)
    page.screenshot(path=str(ART / "6-json-schema.png"), full_page=True)
    ctx.close()
