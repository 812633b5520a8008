"""The chat page in a real headless Chromium (Debian's /usr/bin/chromium driven by Playwright; no browser download)
against a running server with a tiny model: type, send, see thinking and answer stream, stop, toggle thinking off,
set a budget, multi-turn history (every turn, answered or not), new chat, a busy server, the served model's size, a
390 px phone layout, scrolling up while a reply streams, markdown with tables and math from the vendored libraries,
and no HTML injection from user or model text."""

import json
import time
from pathlib import Path

import pytest

from model import count_parameters
from serving.chat import ReplyPiece, build_prompt, parse_web_request, stream_reply
from serving.engine import THINK_BUDGET_CLOSINGS, GenerationRequest, QueueFullError, SamplingParams
from test_app_server import running_server, single_torch_thread, tiny_model  # noqa: F401  (autouse fixture)
from trainer.tokenizer import tiny_tokenizer

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
XSS = '<img src=x onerror="window.__xss=1"><script>window.__xss=2</script>'
PHONE = {"width": 390, "height": 844}

playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(),
                                reason="no /usr/bin/chromium (install it: apt-get install -y chromium)")


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def server(tokenizer):
    # a long context so that replies stream for a while (time to watch them and to press Stop)
    with running_server(tiny_model(tokenizer.vocab_size, max_context=2048), tokenizer, slots=4) as (base, engine):
        yield base, engine


@pytest.fixture(scope="module")
def short_server(tokenizer):
    # a 96-token context: a thinking reply reaches the length limit before it answers
    with running_server(tiny_model(tokenizer.vocab_size, max_context=96), tokenizer, slots=1) as (base, engine):
        yield base, engine


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


def open_page(browser, base: str, **options):
    """A page on the chat, once it has the served model's details. Its .requested lists every URL it asked for."""
    page = browser.new_page(**options)
    page.set_default_timeout(20_000)
    page.requested = []
    page.on("request", lambda request: page.requested.append(request.url))
    page.goto(base)
    page.wait_for_function("document.getElementById('model-name').textContent === 'cortex-tiny'")
    return page


@pytest.fixture(scope="module")
def page(browser, server):
    page = open_page(browser, server[0])
    yield page
    page.close()


def send(page, text: str) -> dict:
    """Types and sends a message; returns the JSON body the page posted to /api/chat."""
    page.fill("#input", text)
    with page.expect_request("**/api/chat") as request:
        page.press("#input", "Enter")
    return json.loads(request.value.post_data)


def wait_until_idle(page):
    page.wait_for_selector("#stop", state="hidden")
    page.wait_for_selector("#send", state="visible")
    page.wait_for_function("fetch('/stats').then(r => r.json()).then(s => s.active === 0 && s.queued === 0)")


def wait_for(condition, timeout_s: float = 20.0):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the engine"
        time.sleep(0.05)


def last_reply(page):
    return page.locator(".message.assistant").last


def set_number(page, box: str, value: str):
    page.fill(box, value)
    page.dispatch_event(box, "change")


def test_the_welcome_text_gives_the_served_models_size(page, server):
    counts = count_parameters(server[1].model.config)
    assert 1e5 <= counts.total < 1e8 and counts.active < 1e5  # the page writes these as "0.4M" and "99K"
    expected = f"{counts.total / 1e6:.1f}M-parameter model ({round(counts.active / 1e3)}K active per token)"
    assert page.locator("#model-size").inner_text() == expected
    assert "0.6B" not in page.locator("#empty-state").inner_text()


def test_thinking_and_answer_stream_then_stop_and_the_stopped_turn_is_history(page, server):
    body = send(page, "Hello Cortex")
    assert body["history"] == [{"role": "user", "content": "Hello Cortex"}] and body["thinking"] is True
    # watch it stream: thinking text appears while the Stop button is still up
    page.wait_for_function("""() => {
        const r = [...document.querySelectorAll('.message.assistant')].pop();
        return r.querySelector('.thinking-text').textContent.length > 0 && !document.getElementById('stop').hidden; }""")
    assert page.locator(".message.user .bubble").last.inner_text() == "Hello Cortex"
    page.click("#stop")
    wait_until_idle(page)
    reply = last_reply(page)
    assert "stopped" in reply.locator(".meta").inner_text()
    thinking, answer = reply.locator(".thinking-text").text_content(), reply.locator(".answer").text_content()

    # stopped while thinking or not, the turn goes with the next request (a reply without answer with its thinking)
    body = send(page, "Go on")
    page.click("#stop")
    wait_until_idle(page)
    first_reply = body["history"][1]
    assert body["history"][0] == {"role": "user", "content": "Hello Cortex"} and first_reply["role"] == "assistant"
    if first_reply["content"]:  # the answer had begun: it is the history, without the thinking
        assert "think" not in first_reply
    else:
        assert first_reply["think"] == thinking
        assert answer == "Stopped while thinking, before an answer (its thinking is above)."
    assert body["history"][2] == {"role": "user", "content": "Go on"}


def test_an_all_thinking_reply_is_shown_and_kept_in_the_history(browser, short_server):
    page = open_page(browser, short_server[0])
    try:
        page.click("#settings-toggle")
        set_number(page, "#temperature-value", "0")
        send(page, "Why is the sky blue?")
        wait_until_idle(page)
        reply = last_reply(page)
        thinking = reply.locator(".thinking-text").text_content()
        assert thinking and reply.locator(".thinking").get_attribute("open") is not None  # left open to be read
        assert reply.locator(".answer").inner_text() == \
            "The reply reached the length limit while thinking, before an answer (its thinking is above)."
        assert "stopped at the length limit" in reply.locator(".meta").inner_text()

        body = send(page, "And why is it red at sunset?")
        assert body["history"] == [{"role": "user", "content": "Why is the sky blue?"},
                                   {"role": "assistant", "content": "", "think": thinking},
                                   {"role": "user", "content": "And why is it red at sunset?"}]
        wait_until_idle(page)
        assert last_reply(page).locator(".error").count() == 0  # the server took that history
    finally:
        page.close()


def test_budget_then_thinking_off_with_multi_turn_history(page, server, tokenizer):
    base, engine = server
    page.click("#new-chat")
    page.click("#settings-toggle")
    page.check("#budget-enable")
    set_number(page, "#budget-value", "60")
    set_number(page, "#temperature-value", "0")
    body = send(page, "Count to three")
    assert body["think_budget_enable"] is True and body["think_budget"] == 60 and body["temperature"] == 0
    # the answer may run to the end of the context: stop it once it has begun
    page.wait_for_function("[...document.querySelectorAll('.message.assistant .answer')].pop().textContent.length > 0")
    page.click("#stop")
    wait_until_idle(page)
    thinking = last_reply(page).locator(".thinking-text").text_content()

    # the same greedy request straight to the engine thinks the same, within the budget
    chat = parse_web_request(body, engine.max_context)
    prompt, _ = build_prompt(tokenizer, chat.messages, chat.thinking, engine.max_context)
    reference = engine.submit(GenerationRequest(prompt, SamplingParams(temperature=0.0, max_new_tokens=62), True, 60))
    pieces = list(stream_reply(reference, tokenizer))
    assert thinking == "".join(p.text for p in pieces if isinstance(p, ReplyPiece) and p.kind == "thinking")
    assert 0 < pieces[-1].thinking_tokens <= 60
    if pieces[-1].thinking_tokens == 60:  # the budget closed the thought with a closing sentence
        assert any(thinking.endswith(closing) for closing in THINK_BUDGET_CLOSINGS.values())

    page.click("#thinking-toggle")
    assert page.get_attribute("#thinking-toggle", "aria-pressed") == "false"
    body = send(page, "And now without thinking")
    assert body["thinking"] is False and body["think_budget_enable"] is False
    assert [m["role"] for m in body["history"]] == ["user", "assistant", "user"]
    assert body["history"][0]["content"] == "Count to three" and body["history"][1]["content"]
    page.wait_for_function("[...document.querySelectorAll('.message.assistant .answer')].pop().textContent.length > 20")
    page.click("#stop")
    wait_until_idle(page)
    assert last_reply(page).locator(".thinking").count() == 0
    page.click("#thinking-toggle")
    page.click("#settings-toggle")


def test_new_chat_starts_an_empty_history(page):
    page.click("#new-chat")
    assert page.locator(".message").count() == 0
    body = send(page, "Fresh start")
    assert body["history"] == [{"role": "user", "content": "Fresh start"}]
    page.click("#stop")
    wait_until_idle(page)


def test_a_busy_server_shows_its_message_and_no_empty_thinking_panel(page, server):
    engine = server[1]
    wait_for(lambda: engine.stats()["active"] == 0 and engine.stats()["queued"] == 0)  # an earlier reply's slot freed
    held = []
    try:
        while True:  # every slot and every queue place taken (greedy from this prompt runs to the end of the context)
            held.append(engine.submit(GenerationRequest([5, 6, 7], SamplingParams(temperature=0.0), False)))
    except QueueFullError:
        pass
    try:
        send(page, "Anyone there?")
        page.wait_for_selector(".message.assistant:last-child .error")
        reply = last_reply(page)
        assert "busy" in reply.locator(".error").inner_text()
        assert reply.locator(".thinking").count() == 0 and reply.locator(".answer").count() == 0
    finally:
        for request in held:
            request.cancel()
    wait_until_idle(page)


def test_the_phone_layout_fits_and_the_user_can_scroll_up_while_a_reply_streams(browser, server):
    page = open_page(browser, server[0], viewport=PHONE)
    try:
        page.click("#settings-toggle")
        page.check("#budget-enable")
        overflow = page.evaluate("""() => [...document.querySelectorAll('.topbar *, .composer *')]
            .filter((el) => el.getClientRects().length)
            .map((el) => [el.id || el.className || el.tagName, el.getBoundingClientRect()])
            .filter(([, r]) => r.left < -0.5 || r.right > window.innerWidth + 0.5).map(([name]) => name)""")
        assert overflow == []
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        set_number(page, "#temperature-value", "0")  # greedy: a long answer, the same every run
        page.click("#settings-toggle")

        page.set_viewport_size({"width": PHONE["width"], "height": 480})  # a short view fills sooner
        page.click("#thinking-toggle")  # an answer only: its text only grows
        send(page, "Tell me a long story")
        messages = "document.getElementById('messages')"
        at_bottom = f"(m => m.scrollHeight - m.scrollTop - m.clientHeight < 24)({messages})"
        page.wait_for_function(f"{messages}.scrollHeight > {messages}.clientHeight + 100 && {at_bottom}")
        page.mouse.move(195, 200)
        page.mouse.wheel(0, -400)
        page.wait_for_function(f"!{at_bottom}")
        held, height = page.evaluate(f"[{messages}.scrollTop, {messages}.scrollHeight]")
        page.wait_for_function(f"{messages}.scrollHeight > {height} + 100")
        assert abs(page.evaluate(f"{messages}.scrollTop") - held) <= 1  # left where the user put it

        page.mouse.wheel(0, 100_000)  # back at the bottom: it follows the text again
        page.wait_for_function(at_bottom)
        height = page.evaluate(f"{messages}.scrollHeight")
        page.wait_for_function(f"{messages}.scrollHeight > {height} + 100 && {at_bottom}")
        page.click("#stop")
        wait_until_idle(page)
    finally:
        page.close()


def test_user_html_is_shown_as_text_never_run(page):
    send(page, XSS)
    page.click("#stop")
    wait_until_idle(page)
    assert page.locator(".message.user .bubble").last.inner_text() == XSS
    assert page.locator("#messages img, #messages script").count() == 0
    assert page.evaluate("window.__xss") is None


def render(page, source: str):
    """Renders markdown into a fresh #probe element; returns its locator."""
    page.evaluate("""(source) => { document.getElementById('probe')?.remove();
        const d = document.createElement('div'); d.id = 'probe'; d.className = 'answer markdown';
        d.innerHTML = renderMarkdown(source); document.body.appendChild(d); }""", source)
    return page.locator("#probe")


def test_markdown_rendering_is_sanitised(page):
    probe = render(page,
                   '# Title\n**bold** and `x<y` [ok](https://example.com) [bad](javascript:alert(1))\n\n'
                   '- a\n- b\n\n```python\nif a < b:\n    print("<b>")\n```\n'
                   '<img src=x onerror=alert(1)> <a href="javascript:alert(1)">x</a> <script>alert(1)</script>\n\n'
                   '![pic](https://example.com/a.png) ![p](javascript:alert(1)) [x](javascript:window.__xss=3)')
    assert probe.locator("h1").inner_text() == "Title" and probe.locator("strong").inner_text() == "bold"
    assert probe.locator("p code").first.inner_text() == "x<y"
    links = probe.locator("a")
    assert links.count() == 2  # [ok] and the image, as a link: nothing is loaded
    assert [links.nth(i).get_attribute("href") for i in range(2)] == ["https://example.com", "https://example.com/a.png"]
    assert all(links.nth(i).get_attribute("rel") == "noopener noreferrer" and links.nth(i).get_attribute("target")
               == "_blank" for i in range(2))
    assert probe.locator("ul > li").all_inner_texts() == ["a", "b"]
    assert probe.locator("code.language-python").text_content() == 'if a < b:\n    print("<b>")'
    assert probe.locator(".code-block .copy-code").count() == 1
    text = probe.inner_text()  # raw HTML and unsafe links stay visible as the text they are
    assert '<img src=x onerror=alert(1)> <a href="javascript:alert(1)">x</a> <script>alert(1)</script>' in text
    assert "[bad](javascript:alert(1))" in text and "[x](javascript:window.__xss=3)" in text
    assert probe.locator("img, script").count() == 0 and page.evaluate("window.__xss") is None


def test_tables_and_math_render_from_the_vendored_libraries(page, server):
    probe = render(page,
                   "| x | x² |\n|---|:-:|\n| 2 | $2^2 = 4$ |\n\n"
                   "Inline $\\frac{a}{b}$ and \\(\\sqrt{2}\\); prices $5 and $10 stay text.\n\nCode keeps `$x$`.\n\n"
                   "$$\n\\int_0^1 x\\,dx = \\tfrac{1}{2}\n$$\n\n"
                   "$\\href{javascript:alert(1)}{click}$ $\\url{https://example.com}$")
    assert probe.locator("table th").all_inner_texts() == ["x", "x²"]
    assert probe.locator("table td").first.inner_text() == "2" and probe.locator("table td .katex").count() == 1
    assert probe.locator(".katex").count() == 6 and probe.locator(".katex-display").count() == 1
    assert probe.locator(".katex svg").count() >= 1  # the square root's sign is an SVG path: kept by the sanitiser
    assert "prices $5 and $10 stay text" in probe.inner_text() and probe.locator("code").inner_text() == "$x$"
    annotations = probe.locator("annotation").all_text_contents()
    assert "\\frac{a}{b}" in annotations and "\\int_0^1 x\\,dx = \\tfrac{1}{2}" in annotations
    assert probe.locator("a").count() == 0  # KaTeX's \href and \url stay off
    # KaTeX's fonts come from static/vendor; nothing was fetched from anywhere but the server
    assert page.evaluate("document.fonts.load('1em KaTeX_Main').then(faces => faces.map(f => f.status))") == ["loaded"]
    assert page.requested and all(url.startswith((server[0] + "/", "data:")) for url in page.requested)
    page.evaluate("document.getElementById('probe').remove()")


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
