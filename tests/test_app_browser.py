"""The chat page in a real headless Chromium (Debian's /usr/bin/chromium driven by Playwright; no browser download)
against a running server with a tiny model: type, send, see thinking and answer stream, stop, toggle thinking off,
set a budget, multi-turn history, new chat, markdown rendering, and no HTML injection from user or model text."""

import json
from pathlib import Path

import pytest

from test_app_server import running_server, single_torch_thread, tiny_model  # noqa: F401  (autouse fixture)
from trainer.tokenizer import tiny_tokenizer

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
XSS = '<img src=x onerror="window.__xss=1"><script>window.__xss=2</script>'

playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(),
                                reason="no /usr/bin/chromium (install it: apt-get install -y chromium)")


@pytest.fixture(scope="module")
def server():
    tokenizer = tiny_tokenizer()
    # a long context so that replies stream for a while (time to watch them and to press Stop)
    with running_server(tiny_model(tokenizer.vocab_size, max_context=2048), tokenizer, slots=4) as (base, engine):
        yield base, engine


@pytest.fixture(scope="module")
def page(server):
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS)
        page = browser.new_page()
        page.set_default_timeout(20_000)
        page.goto(server[0])
        page.wait_for_function("document.getElementById('model-name').textContent === 'cortex-tiny'")
        yield page
        browser.close()


def send(page, text: str) -> dict:
    """Types and sends a message; returns the JSON body the page posted to /api/chat."""
    page.fill("#input", text)
    with page.expect_request("**/api/chat") as request:
        page.press("#input", "Enter")
    return json.loads(request.value.post_data)


def wait_until_idle(page):
    page.wait_for_selector("#stop", state="hidden")
    page.wait_for_selector("#send", state="visible")


def last_reply(page):
    return page.locator(".message.assistant").last


def test_thinking_and_answer_stream_then_stop(page, server):
    body = send(page, "Hello Cortex")
    assert body["history"] == [{"role": "user", "content": "Hello Cortex"}] and body["thinking"] is True
    # watch it stream: thinking text and then answer text appear while the Stop button is still up
    page.wait_for_function("""() => {
        const r = [...document.querySelectorAll('.message.assistant')].pop();
        return r.querySelector('.thinking-text').textContent.length > 0 && !document.getElementById('stop').hidden; }""")
    assert page.locator(".message.user .bubble").last.inner_text() == "Hello Cortex"
    page.click("#stop")
    wait_until_idle(page)
    assert "stopped" in last_reply(page).locator(".meta").inner_text()
    page.wait_for_function("fetch('/stats').then(r => r.json()).then(s => s.active === 0)")


def test_budget_then_thinking_off_with_multi_turn_history(page, server):
    page.click("#settings-toggle")
    page.check("#budget-enable")
    page.fill("#budget-value", "60")
    page.dispatch_event("#budget-value", "change")
    page.fill("#temperature-value", "0")
    page.dispatch_event("#temperature-value", "change")
    body = send(page, "Count to three")
    assert body["think_budget_enable"] is True and body["think_budget"] == 60 and body["temperature"] == 0
    wait_until_idle(page)
    reply = last_reply(page)
    thinking = reply.locator(".thinking-text").text_content()
    meta = reply.locator(".meta").inner_text()  # "<n> tokens (<k> thinking)"
    thinking_tokens = int(meta.split("(")[1].split()[0])
    assert 0 < thinking_tokens <= 60 and thinking
    if thinking_tokens == 60:  # the budget closed the thought with the original's sentence
        assert thinking.endswith("解决方案\n")
    assert reply.locator(".answer").text_content().strip()

    page.click("#thinking-toggle")
    assert page.get_attribute("#thinking-toggle", "aria-pressed") == "false"
    body = send(page, "And now without thinking")
    assert body["thinking"] is False and body["think_budget_enable"] is False
    assert [m["role"] for m in body["history"]] == ["user", "assistant", "user"]  # the stopped first turn (no answer) is not history
    assert body["history"][0]["content"] == "Count to three"
    page.wait_for_function("[...document.querySelectorAll('.message.assistant .answer')].pop().textContent.length > 20")
    page.click("#stop")
    wait_until_idle(page)
    assert last_reply(page).locator(".thinking").count() == 0
    page.click("#thinking-toggle")


def test_new_chat_starts_an_empty_history(page):
    page.click("#new-chat")
    assert page.locator(".message").count() == 0
    body = send(page, "Fresh start")
    assert body["history"] == [{"role": "user", "content": "Fresh start"}]
    page.click("#stop")
    wait_until_idle(page)


def test_user_html_is_shown_as_text_never_run(page):
    send(page, XSS)
    page.click("#stop")
    wait_until_idle(page)
    assert page.locator(".message.user .bubble").last.inner_text() == XSS
    assert page.locator("#messages img, #messages script").count() == 0
    assert page.evaluate("window.__xss") is None


def test_markdown_rendering_is_sanitised(page):
    html = page.evaluate("""renderMarkdown(
        '# Title\\n**bold** and `x<y` [ok](https://example.com) [bad](javascript:alert(1))\\n\\n' +
        '- a\\n- b\\n\\n```python\\nif a < b:\\n    print("<b>")\\n```\\n' +
        '<img src=x onerror=alert(1)> <a href="javascript:alert(1)">x</a> <script>alert(1)</script>')""")
    assert "<h1>Title</h1>" in html and "<strong>bold</strong>" in html and "<code>x&lt;y</code>" in html
    assert '<a href="https://example.com" target="_blank" rel="noopener noreferrer">ok</a>' in html
    assert "<ul><li>a</li><li>b</li></ul>" in html
    assert '<code class="language-python">if a &lt; b:\n    print(&quot;&lt;b&gt;&quot;)</code>' in html
    assert 'href="javascript' not in html and "<img" not in html and "<script" not in html
    # whatever the model writes goes through the same renderer: check the DOM after rendering it
    page.evaluate(f"""(() => {{ const d = document.createElement('div'); d.id = 'probe';
        d.innerHTML = renderMarkdown({json.dumps(XSS + ' [x](javascript:window.__xss=3)')}); document.body.appendChild(d); }})()""")
    assert page.locator("#probe img, #probe script, #probe a").count() == 0
    assert page.evaluate("window.__xss") is None


def test_a_malformed_stream_is_shown_as_a_stream_error(page):
    page.route("**/api/chat", lambda route: route.fulfill(
        status=200, content_type="text/event-stream",
        body='data: {"event": "answer_chunk", "data": "partial"}\n\ndata: {not json\n\n'))
    try:
        send(page, "Hello")
        wait_until_idle(page)
        shown = last_reply(page).inner_text()
        assert "The reply stream broke off or was malformed" in shown and "Could not reach" not in shown
    finally:
        page.unroute("**/api/chat")
