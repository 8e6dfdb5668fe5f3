"""The chat page at `GET /`, driven in a real headless Chromium (Debian's chromium + chromium-driver, via selenium).

One browser and a few in-process servers over the tiny random checkpoint serve the whole module. Greedy answers are
checked against `ChatModel.generate`, and the usage line's input tokens prove which images reached the model.
Without chromium the browser tests fail (CI must run them); VLM_SKIP_BROWSER=1 skips them on purpose.
VLM_SCREENSHOT_DIR=DIR saves the screenshots (web_chat.png: a finished conversation with an image; web_chat_phone.png:
the same at 390x844); docs/web_chat.png in the README is made this way.
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest
from live_server import LiveServer
from PIL import Image, ImageDraw

from vlm.chat import Completion
from vlm.generation.options import H2OSettings
from vlm.serve import ServeSettings, create_app
from vlm.server.web import h2o_budget, page_url

QUESTION = "What color is the shape?"
# max_image_bytes is small so that a noisy 64x64 image is over it even as a JPEG; max_queue=2 so a new request never
# races the release of the one that just ended
SETTINGS = dict(max_concurrency=1, max_queue=2, max_image_bytes=4096, max_images=3, default_max_tokens=16)
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage")
XSS = "<img src=x onerror=alert(1)>"
REPLY = ("The picture shows two shapes on a pale blue background:\n\n- a **red circle** on the left\n"
         "- a **blue square** on the right, a little smaller\n\nNothing else is in the image.")


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def shapes_png(size=(320, 240)) -> bytes:
    """A picture worth asking about: a red circle and a blue square on a pale background."""
    image = Image.new("RGB", size, (236, 241, 248))
    draw = ImageDraw.Draw(image)
    w, h = size
    draw.ellipse((w * 0.12, h * 0.2, w * 0.5, h * 0.7), fill=(214, 48, 49))
    draw.rectangle((w * 0.58, h * 0.35, w * 0.86, h * 0.72), fill=(45, 98, 200))
    return png_bytes(image)


def solid_png(color, size=(48, 40)) -> bytes:
    return png_bytes(Image.new("RGB", size, color))


def noise_png(size=64) -> bytes:
    return png_bytes(Image.frombytes("RGB", (size, size), os.urandom(size * size * 3)))


# ---- the server and the page without a browser ----


@pytest.fixture(scope="module")
def serve(tiny_chat_model):
    """serve(**settings) -> the LiveServer over the tiny model; all stopped after the module."""
    servers: list[LiveServer] = []

    def start(**settings) -> LiveServer:
        servers.append(LiveServer(create_app(tiny_chat_model, ServeSettings(**settings))))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def live(serve) -> LiveServer:
    return serve(**SETTINGS)


def test_page_assets_config_and_web_false(live, serve, tiny_chat_model):
    with httpx.Client(base_url=live.url, timeout=30) as client:
        page = client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert '<script src="/web/chat.js"' in page.text and "https://" not in page.text  # no CDN
        head = client.head("/")  # uptime checks and curl -I
        assert head.status_code == 200 and head.headers["content-type"].startswith("text/html") and not head.content
        for name, kind in (("chat.js", "text/javascript"), ("chat.css", "text/css")):
            asset = client.get(f"/web/{name}")
            assert asset.status_code == 200 and asset.headers["content-type"].startswith(kind)
            assert "http://" not in asset.text and "https://" not in asset.text
        config = client.get("/web/config").json()
        tiler = tiny_chat_model.processor.tiler
        assert config["image_pixels"] == tiler.config.max_tiles * tiler.tile_size ** 2
        assert (config["max_images"], config["max_image_bytes"], config["max_tokens"]) == (3, 4096, 16)
        assert config["max_tokens_limit"] == tiny_chat_model.context_length and not config["api_key_required"]
    off = serve(web=False)
    with httpx.Client(base_url=off.url, timeout=30) as client:
        assert client.get("/").status_code == 404 and client.get("/web/chat.js").status_code == 404
        reply = client.post("/v1/messages", json={"model": "x", "max_tokens": 1,
                                                  "messages": [{"role": "user", "content": "Hi"}]})
        assert reply.status_code == 200  # the APIs stay on


def test_the_pages_default_answer_length_is_within_the_servers_limit(tiny_chat_model):
    """The page sends its default max_tokens with every request: a server default over the limit (the model's context,
    or max_tokens_limit) would have each one refused, so the page is told the limit instead."""
    from vlm.server.app import Server
    from vlm.server.web import page_config

    servers = [Server(tiny_chat_model, ServeSettings(default_max_tokens=100_000)),
               Server(tiny_chat_model, ServeSettings(default_max_tokens=100, max_tokens_limit=64))]
    try:
        configs = [page_config(server) for server in servers]
    finally:
        for server in servers:
            server.pool.shutdown()
    assert configs[0]["max_tokens"] == configs[0]["max_tokens_limit"] == tiny_chat_model.context_length
    assert (configs[1]["max_tokens"], configs[1]["max_tokens_limit"]) == (64, 64)


def test_the_h2o_budget_is_said_as_the_cache_keeps_it():
    assert h2o_budget(H2OSettings()) == ("the first 4 tokens, the 10% of the prompt most attended to and the newest "
                                         "10% of the prompt")
    assert h2o_budget(H2OSettings(heavy=0, recent=64, sinks=1)) == "the first 1 token and the newest 64 tokens"


def test_page_url_for_the_bind_address():
    assert page_url("127.0.0.1", 8000) == "http://127.0.0.1:8000/"
    assert page_url("0.0.0.0", 80) == "http://127.0.0.1:80/"  # a wildcard bind is opened through loopback
    assert page_url("::", 8000) == "http://[::1]:8000/"
    assert page_url("myhost", 1) == "http://myhost:1/"


# ---- in the browser ----


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium for the module (fresh profile; flags that keep it off the network)."""
    if os.environ.get("VLM_SKIP_BROWSER") == "1":
        pytest.skip("VLM_SKIP_BROWSER=1: browser tests skipped on request")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not chromium or not driver_path:
        pytest.fail("the chat page tests need Chromium and its driver: apt-get install chromium chromium-driver "
                    "(or set VLM_SKIP_BROWSER=1 to skip them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="vlm-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(driver_path))  # a given driver: no download
    driver.set_script_timeout(30)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


class Page:
    """The chat page in the browser, with the few actions and reads the tests need."""

    def __init__(self, driver, url: str, files: Path):
        self.driver, self.url, self.files = driver, url, files  # files: where uploads are written first

    def open(self, keep_settings: bool = False) -> Page:
        self.driver.get(self.url)
        if not keep_settings:  # a fresh page: no settings, and no conversation kept from a test before
            self.js("localStorage.clear(); sessionStorage.clear()")
            self.driver.get(self.url)
        self.wait("document.body.dataset.ready === 'true'")
        return self

    def js(self, script: str, *args):
        return self.driver.execute_script(script, *args)

    def wait(self, condition: str, timeout: float = 30, *args):
        deadline = time.time() + timeout
        while not (value := self.js(f"return ({condition})", *args)):
            assert time.time() < deadline, f"timed out waiting for {condition}"
            time.sleep(0.02)
        return value

    def find(self, css: str):
        return self.driver.find_element("css selector", css)

    def attach_file(self, data: bytes, name: str) -> None:
        path = self.files / name
        path.write_bytes(data)
        self.find("#file-input").send_keys(str(path))

    def dispatch_files(self, event: str, data: bytes, name: str, text: str | None = None) -> bool:
        """A real paste or drop event carrying a File made of `data` (and `text`, as a spreadsheet's copy carries
        both), as the clipboard or a drag would carry it. False when the page cancelled the browser's own handling."""
        return self.js("""
            const [kind, b64, name, text] = arguments;
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            if (text !== null) transfer.setData("text/plain", text);
            transfer.items.add(new File([bytes], name, {type: "image/png"}));
            const init = {bubbles: true, cancelable: true};
            const target = kind === "paste" ? document.getElementById("prompt") : document.getElementById("messages");
            return target.dispatchEvent(kind === "paste"
                ? new ClipboardEvent("paste", {...init, clipboardData: transfer})
                : new DragEvent("drop", {...init, dataTransfer: transfer}));
        """, event, base64.b64encode(data).decode(), name, text)

    def thumbnails_ready(self, count: int) -> None:
        self.wait(f"document.querySelectorAll('#attachments .thumb[data-ready=\"true\"]').length === {count} && "
                  f"document.querySelectorAll('#attachments .thumb').length === {count}")

    def attached_images(self) -> list[bytes]:
        """The bytes the page will upload for each waiting image (after any downscaling)."""
        return [base64.b64decode(data) for data in self.js("return state.attached.map((a) => a.data)")]

    def type(self, *keys) -> None:
        self.find("#prompt").send_keys(*keys)

    def send(self, text: str) -> None:
        from selenium.webdriver.common.keys import Keys

        self.type(text, Keys.ENTER)

    def set_setting(self, element_id: str, value: str) -> None:
        element = self.find(f"#{element_id}")
        element.clear()
        element.send_keys(value)

    def settings(self, max_tokens: int | None = None, greedy: bool = False, system: str | None = None,
                 api_key: str | None = None) -> None:
        self.find("#settings-toggle").click()
        if max_tokens is not None:
            self.set_setting("max-tokens", str(max_tokens))
        if greedy:
            if self.find("#temperature-auto").is_selected():
                self.find("#temperature-auto").click()
            from selenium.webdriver.common.keys import Keys

            self.find("#temperature").send_keys(Keys.HOME)  # the slider's lowest value: 0, greedy
        if system is not None:
            self.set_setting("system", system)
        if api_key is not None:
            self.set_setting("api-key", api_key)
        self.find("#settings-close").click()

    def answers(self) -> list[dict]:
        return self.js("""return [...document.querySelectorAll('.message.assistant')].map((a) => ({
            state: a.dataset.state, text: a.querySelector('.content').textContent,
            usage: a.querySelector('.usage')?.textContent || '', error: a.querySelector('.error')?.textContent || '',
            imgs: a.querySelectorAll('img').length}))""")

    def last_answer(self, done_states=("done", "stopped", "error"), timeout: float = 60) -> dict:
        states = ", ".join(f"'{s}'" for s in done_states)
        self.wait(f"[{states}].includes([...document.querySelectorAll('.message.assistant')].at(-1)?.dataset.state)",
                  timeout)
        return self.answers()[-1]

    def viewport(self, width: int, height: int) -> None:
        """Size the window so the page itself gets width x height CSS pixels (the window adds its frame)."""
        self.driver.set_window_size(width, height)
        inner_w, inner_h = self.js("return [window.innerWidth, window.innerHeight]")
        self.driver.set_window_size(2 * width - inner_w, 2 * height - inner_h)
        self.wait(f"window.innerWidth === {width} && window.innerHeight === {height}", 5)

    def screenshot(self, name: str) -> None:
        folder = os.environ.get("VLM_SCREENSHOT_DIR")
        if folder:
            Path(folder).mkdir(parents=True, exist_ok=True)
            self.driver.save_screenshot(str(Path(folder) / name))


@pytest.fixture
def page(browser, live, tmp_path) -> Page:
    page = Page(browser, live.url, tmp_path)
    page.viewport(1280, 800)
    return page.open()


def same_text(shown: str, text: str) -> bool:
    """The rendered answer is the model's text, markdown blocks aside (paragraph breaks are not text nodes)."""
    return "".join(shown.split()) == "".join(text.split())


def greedy(model, messages: list[dict], images: list[bytes], max_tokens: int) -> Completion:
    return model.generate(messages, images, max_new_tokens=max_tokens, temperature=0)


def check_usage(usage: str, expected: Completion) -> None:
    assert usage.startswith(f"{expected.input_tokens} in · {expected.output_tokens} out · "), usage
    assert usage.endswith(f"tok/s · {expected.stop_reason}"), usage


def shown_speed(usage: str) -> float:
    """The tokens per second a usage line shows ("14 in · 6 out · 55.0 tok/s · end_turn")."""
    return float(usage.split(" · ")[2].removesuffix(" tok/s"))


@pytest.mark.slow
def test_image_question_streams_a_growing_answer(page, tiny_chat_model):
    """File picker -> downscaled upload -> Enter -> the answer grows on screen until it is complete.

    The random model's greedy answer to any image question is blank lines, so this one samples (temperature 1):
    the words are unpredictable, but each partial state must be the start of the final answer, and the usage line's
    input tokens must be those of the question with the uploaded image."""
    from selenium.webdriver.common.keys import Keys

    page.settings(max_tokens=64)
    page.find("#settings-toggle").click()
    page.find("#temperature-auto").click()
    page.find("#temperature").send_keys(Keys.END)  # the slider's highest value: 1
    page.find("#settings-close").click()
    page.attach_file(shapes_png(), "shapes.png")
    page.thumbnails_ready(1)
    (upload,) = page.attached_images()
    budget = page.js("return state.config.image_pixels")
    with Image.open(io.BytesIO(upload)) as sent:
        assert sent.width * sent.height <= budget < 320 * 240  # scaled to the tiler's budget before upload
        assert abs(sent.width / sent.height - 320 / 240) < 0.05
    page.type("What color is", Keys.SHIFT, Keys.ENTER, Keys.NULL, "the shape?")
    assert page.js("return document.getElementById('prompt').value") == "What color is\nthe shape?"  # Shift+Enter
    # every text the answer shows while it streams, recorded in the page itself: polling from here would miss states
    # on a busy machine
    page.js("""window.partials = [];
        new MutationObserver(() => {
            const answer = [...document.querySelectorAll('.message.assistant')].at(-1);
            const text = answer?.querySelector('.content')?.textContent;
            if (answer?.dataset.state === 'streaming' && text && window.partials.at(-1) !== text) {
                window.partials.push(text);
            }
        }).observe(document.body, {subtree: true, childList: true, characterData: true});""")
    page.type(Keys.ENTER)
    answer = page.last_answer()
    partial = page.js("return window.partials")
    assert answer["state"] == "done" and answer["imgs"] == 0, answer
    final = "".join(answer["text"].split())
    growing = ["".join(p.split()) for p in partial if "".join(p.split()) != final]
    assert len(growing) >= 2, f"the answer did not stream: partial states {partial}"
    assert all(final.startswith(p) for p in growing)
    assert all(len(a) < len(b) for a, b in zip(growing, growing[1:], strict=False))
    prompt = tiny_chat_model.prepare([{"role": "user", "content": "<image>\nWhat color is\nthe shape?"}], [upload])
    assert answer["usage"].startswith(f"{prompt.input_tokens} in · "), answer["usage"]
    assert answer["usage"].endswith(" · max_tokens") or answer["usage"].endswith(" · end_turn")
    assert page.js("return document.querySelector('.message.user img').naturalWidth") == 320  # the original shown
    page.open(keep_settings=True)  # a reload keeps the conversation, with the image as it was sent
    assert [a["text"] for a in page.answers()] == [answer["text"]]
    with Image.open(io.BytesIO(upload)) as sent:
        assert page.js("return document.querySelector('.message.user img').naturalWidth") == sent.width
    assert page.js("return state.turns[0].images[0].data") == base64.b64encode(upload).decode()


@pytest.mark.slow
def test_screenshot_of_a_conversation_with_an_image_and_the_phone_layout(page, live, monkeypatch):
    """The README's screenshot: a real upload and a real stream, with the reply scripted at the model (the test's
    model is random, and its words would only be noise). Then the same page at phone width: no sideways scrolling,
    and the settings cover the screen as a modal sheet."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    words = REPLY.split(" ")
    monkeypatch.setattr(live.app.state.server.chat, "stream", lambda prompt, cancel=None, **options: ScriptedStream(
        prompt, [w + " " for w in words[:-1]] + words[-1:], delay=0.01))
    page.attach_file(shapes_png(), "shapes.png")
    page.thumbnails_ready(1)
    asked = time.perf_counter()
    page.send("What is in this picture?")
    answer = page.last_answer()
    took = time.perf_counter() - asked
    assert answer["state"] == "done" and answer["text"].startswith("The picture shows")
    # the speed shown is the pieces over the time they streamed: at most the time from Enter to the end, and at least
    # the pacing of half of them (the rest leave room for a browser slow to see the response start); 0.05: rounding
    pieces = len(words)
    assert answer["usage"].split(" · ")[1] == f"{pieces} out", answer["usage"]
    assert pieces / took - 0.05 <= shown_speed(answer["usage"]) <= pieces / (pieces // 2 * 0.01) + 0.05, \
        (answer["usage"], took)
    assert page.js("return document.querySelectorAll('.message.assistant li').length") == 2
    page.screenshot("web_chat.png")
    page.viewport(390, 844)  # a phone
    try:
        page.wait("document.documentElement.scrollWidth <= window.innerWidth")
        assert page.js("const r = document.getElementById('send').getBoundingClientRect();"
                       "return r.right <= window.innerWidth && r.bottom <= window.innerHeight")  # reachable
        page.screenshot("web_chat_phone.png")
        page.find("#settings-toggle").click()
        panel = page.js("const r = document.getElementById('settings').getBoundingClientRect();"
                        "return [r.width, r.height]")
        assert panel == page.js("return [window.innerWidth, window.innerHeight]")
        # a modal sheet: Tab goes round its own controls (and the browser's), never to the chat hidden behind it
        assert page.js("return document.getElementById('settings').getAttribute('aria-modal')") == "true"
        reached = set()
        for _ in range(16):
            ActionChains(page.driver).send_keys(Keys.TAB).perform()  # a real key press, to whatever has the focus
            reached.add(page.js("const a = document.activeElement;"
                                "return document.getElementById('settings').contains(a) ? 'settings' :"
                                "a === document.body ? 'body' : a.id || a.tagName"))
        assert reached <= {"settings", "body"} and "settings" in reached, reached
        page.find("#settings-close").click()
        assert page.js("return !document.querySelector('main').inert && document.activeElement.id") == \
            "settings-toggle"
    finally:
        page.viewport(1280, 800)
    page.find("#settings-toggle").click()  # beside the chat on a wide screen: not modal
    assert page.js("return !document.querySelector('main').inert && "
                   "!document.getElementById('settings').hasAttribute('aria-modal')")
    page.find("#settings-close").click()


@pytest.mark.slow
def test_stop_mid_answer_frees_the_server_and_keeps_the_words_shown(page, live, tiny_chat_model):
    """Stop ends the answer where it is: the server frees its slot, and the words shown so far stay in the chat, after
    a reload too, and go with the next question as the conversation's answer."""
    page.settings(max_tokens=400, greedy=True)
    before = httpx.get(f"{live.url}/health").json()["finished"].get("cancelled", 0)
    page.send(QUESTION)
    # the greedy answer opens with blank lines, which are never sent back: wait for words
    page.wait("document.querySelector('.message.assistant .content').textContent.includes('there')")
    page.find("#stop").click()
    stopped = page.last_answer()
    assert stopped["state"] == "stopped" and stopped["usage"].endswith("stopped") and stopped["text"]
    kept = page.js("return state.turns.filter((t) => t.role === 'assistant').map((t) => t.text)")
    assert len(kept) == 1 and "there" in kept[0] and same_text(stopped["text"], kept[0])
    deadline = time.time() + 10
    while (health := httpx.get(f"{live.url}/health").json())["running"] or health["queued"]:
        assert time.time() < deadline, f"the server did not free the slot: {health}"
        time.sleep(0.05)
    assert health["finished"]["cancelled"] == before + 1  # ended by the stop, not run to 400 tokens
    page.open(keep_settings=True)
    assert [(a["state"], a["text"]) for a in page.answers()] == [("stopped", stopped["text"])]
    page.settings(max_tokens=4)
    page.send("And now?")
    follow_up = page.last_answer()
    assert follow_up["state"] == "done"
    check_usage(follow_up["usage"], greedy(tiny_chat_model, [
        {"role": "user", "content": QUESTION}, {"role": "assistant", "content": kept[0]},
        {"role": "user", "content": "And now?"}], [], 4))


@pytest.mark.slow
def test_paste_and_drop_attach_images(page, live, monkeypatch, tiny_chat_model):
    red, blue, green = solid_png((220, 30, 30)), solid_png((30, 30, 220)), solid_png((30, 200, 30))
    page.settings(max_tokens=4, greedy=True)
    # an image alone is attached, not pasted as its file name; with text (a spreadsheet's cells), the text is pasted
    # into the box as the browser does, and the image attached
    assert page.dispatch_files("paste", green, "green.png") is False
    page.thumbnails_ready(1)
    page.find("#attachments .thumb-remove").click()  # the remove button drops it again
    page.thumbnails_ready(0)
    assert page.dispatch_files("paste", green, "cells.png", text="a\tb") is True
    page.thumbnails_ready(1)
    page.find("#attachments .thumb-remove").click()
    page.thumbnails_ready(0)
    page.dispatch_files("paste", red, "red.png")
    page.dispatch_files("drop", blue, "blue.png")
    page.dispatch_files("drop", green, "green.png")
    page.thumbnails_ready(3)
    page.dispatch_files("paste", green, "fourth.png")  # over the server's max_images=3: refused with a notice
    assert "at most 3 images" in page.find("#notice").text
    page.thumbnails_ready(3)
    page.find("#attachments .thumb:last-child .thumb-remove").click()
    page.thumbnails_ready(2)
    assert page.attached_images() == [red, blue]  # small images go up as they are
    encoded = []  # the images of each prompt the server encodes (the model's answers here do not depend on order)
    chat = live.app.state.server.chat
    prepare = chat.prepare

    def recording_prepare(messages, images=()):
        encoded.append(list(images))
        return prepare(messages, images)

    monkeypatch.setattr(chat, "prepare", recording_prepare)
    page.send(QUESTION)
    answer = page.last_answer()
    assert answer["state"] == "done", answer
    assert encoded and all(images == [red, blue] for images in encoded)  # both, in the order they were attached
    monkeypatch.undo()
    assert page.js("return document.querySelectorAll('.message.user img').length") == 2
    expected = greedy(tiny_chat_model, [{"role": "user", "content": f"<image>\n<image>\n{QUESTION}"}], [red, blue], 4)
    assert same_text(answer["text"], expected.text)
    check_usage(answer["usage"], expected)  # both images' tokens are in the prompt
    # a photo over the tiler's pixel budget goes up scaled down, and still shows as chosen after a reload
    page.dispatch_files("paste", solid_png((30, 200, 30), (320, 240)), "big.png")
    page.thumbnails_ready(1)
    page.send(QUESTION)
    page.last_answer()
    shown = "return [...document.querySelectorAll('.message.user img')].at(-1).getBoundingClientRect().width"
    before = page.js(shown)
    assert page.js("return state.turns.at(-2).images[0].data.length") < len(base64.b64encode(
        solid_png((30, 200, 30), (320, 240))))  # the sent copy is the scaled-down one
    page.open(keep_settings=True)
    assert page.js(shown) == before > 100
    # the 3 images the server takes per conversation are all in the chat now (kept across the reload): a fourth is
    # refused when attached, rather than by the server's 400 once sent
    page.dispatch_files("paste", green, "fourth.png")
    page.wait("document.getElementById('notice').textContent.includes('at most 3 images')")
    page.thumbnails_ready(0)
    # a wide picture and a tall one in one message: each scaled whole, its proportions kept, neither cropped
    page.find("#new-chat").click()  # within the server's 3 images
    page.dispatch_files("paste", solid_png((30, 30, 220), (400, 50)), "banner.png")
    page.dispatch_files("paste", solid_png((220, 30, 30), (60, 300)), "pillar.png")
    page.thumbnails_ready(2)
    page.send(QUESTION)
    page.last_answer()
    boxes = page.js("return [...document.querySelectorAll('.message.user img')].slice(-2).map((img) => {"
                    "const box = img.getBoundingClientRect(); return [box.width, box.height, "
                    "getComputedStyle(img).objectFit]; })")
    assert abs(boxes[0][0] / boxes[0][1] - 8) < 0.5 and abs(boxes[1][0] / boxes[1][1] - 0.2) < 0.05, boxes
    assert boxes[0][0] <= 240 and boxes[1][1] <= 180 and {b[2] for b in boxes} == {"contain"}, boxes


@pytest.mark.slow
def test_oversized_image_error_then_next_message_works(page, tiny_chat_model):
    from selenium.webdriver.common.keys import Keys

    page.settings(max_tokens=4, greedy=True)
    page.attach_file(noise_png(), "noise.png")
    page.thumbnails_ready(1)
    page.send(QUESTION)
    failed = page.last_answer()
    assert failed["state"] == "error" and "400 invalid_request_error" in failed["error"], failed
    assert "over the 4,096-byte limit" in failed["error"]
    assert failed["error"].endswith("Send fewer or smaller images.")  # the server's 400 for it, as for a 413
    assert page.js("return document.querySelector('.message.user').classList.contains('failed')")
    assert page.js("return document.getElementById('prompt').value") == QUESTION  # back in the box to edit
    page.thumbnails_ready(1)  # with its image, which the user takes out before sending again
    # the refused message's image counts once (in the box), not also in the chat: two more fit the server's 3
    page.attach_file(solid_png((200, 30, 30)), "red.png")
    page.attach_file(solid_png((30, 30, 200)), "blue.png")
    page.thumbnails_ready(3)
    for _ in range(2):
        page.find("#attachments .thumb:last-child .thumb-remove").click()
    page.thumbnails_ready(1)
    page.find(".thumb-remove").click()
    page.type(Keys.ENTER)
    answer = page.last_answer()
    assert answer["state"] == "done", answer
    # the resent message took the refused one's place: one question, one answer
    assert page.js("return document.querySelectorAll('.message.user').length") == 1 and len(page.answers()) == 1
    # a file the browser cannot decode is not scaled down: over the byte limit, it is refused when attached
    page.attach_file(b"RIFF" + b"\0" * 5000, "odd.webp")
    page.wait("document.getElementById('notice').textContent.includes('over this server')")
    assert page.find("#notice").text == "odd.webp: 5,004 bytes, over this server's 4,096-byte limit for an image"
    assert page.js("return state.attached.length") == 0
    expected = greedy(tiny_chat_model, [{"role": "user", "content": QUESTION}], [], 4)  # the failed turn is left out
    assert same_text(answer["text"], expected.text)
    check_usage(answer["usage"], expected)


@pytest.mark.slow
def test_controls_are_labelled_and_work_from_the_keyboard(page):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    def press(*keys, shift: bool = False) -> None:  # real key presses to whatever has the focus
        actions = ActionChains(page.driver)
        if shift:
            actions.key_down(Keys.SHIFT)
        for key in keys:
            actions.send_keys(key)
        if shift:
            actions.key_up(Keys.SHIFT)
        actions.perform()

    unnamed = page.js("""return [...document.querySelectorAll('button, input, select, textarea')].filter((e) =>
        !e.labels?.length && !e.getAttribute('aria-label') && !e.textContent.trim()).map((e) => e.outerHTML)""")
    assert unnamed == []  # every control has a name a screen reader can say
    page.js("document.getElementById('new-chat').focus()")
    order = []
    for _ in range(4):
        press(Keys.TAB)
        order.append(page.js("return document.activeElement.id"))
    assert order == ["settings-toggle", "file-input", "prompt", "send"]
    press(Keys.TAB, Keys.TAB, Keys.TAB, shift=True)
    press(Keys.ENTER)  # on the Settings button
    assert page.js("return !document.getElementById('settings').hidden && document.activeElement.id === 'model'")
    press(Keys.ESCAPE)  # closes the settings
    assert page.js("return document.getElementById('settings').hidden")
    page.settings(max_tokens=100_000)  # over the model's limit: marked, and the limit is sent instead
    assert page.js("return document.getElementById('max-tokens').getAttribute('aria-invalid')") == "true"
    assert page.js("return document.getElementById('max-tokens-help').textContent").startswith("From 1 to 512")
    page.type(QUESTION)
    page.js("document.getElementById('send').focus()")
    press(Keys.ENTER)  # Send from the keyboard: its button hides, and the focus moves to Stop, not to the page
    page.wait("document.querySelector('.message.assistant .content').textContent.length > 0")
    assert page.js("return document.activeElement.id") == "stop"
    page.find("#settings-toggle").click()
    press(Keys.ESCAPE)  # in the open settings: closes them, and the answer goes on
    assert page.js("return document.getElementById('settings').hidden && document.body.classList.contains('busy')")
    press(Keys.ESCAPE)  # stops the answer
    assert page.last_answer()["state"] == "stopped"


class ScriptedStream:
    """Stands in for ChatModel.stream's TextStream, replaying fixed text: what the model says is this test's input,
    and the page's rendering of it is what is under test."""

    def __init__(self, prompt, pieces: list[str], delay: float = 0.0):
        self.prompt, self.pieces, self.delay, self.completion = prompt, pieces, delay, None

    def __iter__(self):
        for piece in self.pieces:
            time.sleep(self.delay)  # paced like a model, so the usage line shows a plausible speed
            yield piece
        text = "".join(self.pieces)
        self.completion = Completion(text, "end_turn", self.prompt.input_tokens, len(self.pieces))

    def __enter__(self) -> ScriptedStream:
        return self

    def __exit__(self, *exc) -> None:
        pass


@pytest.mark.slow
def test_model_output_is_rendered_as_text_never_html(page, live, monkeypatch):
    pieces = ["Here: ", XSS, "\n\n```html\n<script>window.ran = 1</script>\n```\n", "- one **bold**\n- two `<b>`\n",
              "- three **bold `<i>` code**\n", "\n1. first\n   - sub a\n   - sub b\n2. second\n   goes on\n",
              "\n## Notes <b>\n"]
    monkeypatch.setattr(live.app.state.server.chat, "stream",
                        lambda prompt, cancel=None, **options: ScriptedStream(prompt, pieces))
    page.send("Say something dangerous")
    answer = page.last_answer()
    assert answer["state"] == "done" and answer["imgs"] == 0
    assert XSS in answer["text"] and "<script>window.ran = 1</script>" in answer["text"]
    assert page.js("return document.querySelectorAll('img[src=\"x\"], script:not([src])').length") == 0
    assert page.js("return window.ran === undefined")
    assert page.js("return document.querySelector('.message.assistant pre code').textContent") == \
        "<script>window.ran = 1</script>"
    heading = "const h = document.querySelector('.message.assistant [role=heading]'); " \
              "return [h.ariaLevel, h.textContent]"
    assert page.js(heading) == ["4", "Notes <b>"]  # below the page's h1 and the settings' h2
    assert page.js("return [...document.querySelectorAll('.message.assistant .content > ul > li')]"
                   ".map((li) => li.innerHTML)") == \
        ["one <strong>bold</strong>", "two <code>&lt;b&gt;</code>",
         "three <strong>bold <code>&lt;i&gt;</code> code</strong>"]  # markdown as elements, text escaped
    # a list nests by indentation, and an item's indented next line stays in it
    assert page.js("return [...document.querySelectorAll('.message.assistant ol > li')].map((li) => li.innerHTML)") \
        == ["first<ul><li>sub a</li><li>sub b</li></ul>", "second<br>goes on"]
    from selenium.common.exceptions import NoAlertPresentException

    with pytest.raises(NoAlertPresentException):
        page.driver.switch_to.alert.text  # noqa: B018 (reading it is the check)


@pytest.mark.slow
def test_a_reload_mid_answer_keeps_the_question_and_odd_settings_and_files_are_read_as_shown(page, live, monkeypatch):
    monkeypatch.setattr(live.app.state.server.chat, "stream",
                        lambda prompt, cancel=None, **options: ScriptedStream(prompt, ["slow "] * 200, delay=0.05))
    page.send("Tell me a long story")
    page.wait("document.querySelector('.message.assistant .content').textContent")  # streaming
    page.open(keep_settings=True)
    assert page.js("return document.querySelector('.message.user .content').textContent") == "Tell me a long story"
    assert page.answers()[-1]["state"] == "stopped"
    assert "not answered: the page was reloaded" in page.answers()[-1]["usage"] and page.find(".regenerate")
    page.settings(max_tokens="1e2")  # a number input reads "1e2" as 100: so does the page
    assert page.js("return state.settings.maxTokens") == 100
    page.settings(max_tokens="1.7")  # no whole number of tokens: marked, and the server's default goes
    assert page.js("return [state.settings.maxTokens, document.getElementById('max-tokens').ariaInvalid]") == \
        [None, "true"]
    page.settings(max_tokens="")  # emptied: the server's default, shown as the placeholder, and not an error
    page.open(keep_settings=True)
    page.settings(system="Be brief.")  # another setting leaves it so: a later server default still applies
    assert page.js("return [JSON.parse(localStorage.getItem('vlm.chat.settings')).maxTokens, "
                   "document.getElementById('max-tokens').ariaInvalid, "
                   "document.getElementById('max-tokens').placeholder]") == [None, "false", "16 (the server's default)"]
    page.attach_file(b"plain text, not a picture", "notes.png")  # named like an image, refused on the spot
    page.wait("document.getElementById('notice').textContent === 'notes.png: not a readable image'")
    assert page.js("return state.attached.length") == 0
    page.find("#new-chat").click()  # what the notice said was about the old chat
    assert page.find("#notice").text == ""


@pytest.mark.slow
def test_regenerate_new_chat_and_settings_persist(page, tiny_chat_model):
    page.settings(max_tokens=6, greedy=True, system="Answer briefly.")
    page.send(QUESTION)
    first = page.last_answer()
    expected = greedy(tiny_chat_model, [{"role": "system", "content": "Answer briefly."},
                                        {"role": "user", "content": QUESTION}], [], 6)
    assert same_text(first["text"], expected.text)
    check_usage(first["usage"], expected)  # the system prompt went with it
    page.find(".regenerate").click()  # removes the answer at once, then streams a new one
    again = page.last_answer()
    assert len(page.answers()) == 1 and same_text(again["text"], expected.text)  # redone in place (greedy)
    page.settings(max_tokens=400)
    page.send("Tell me a long story")
    page.wait("document.querySelectorAll('.message.assistant')[1]?.querySelector('.content').textContent")
    page.find("#new-chat").click()  # mid-answer: stops it and forgets the whole conversation
    assert page.answers() == [] and page.js("return !document.getElementById('empty').hidden")
    page.settings(max_tokens=6)
    page.send(QUESTION)
    fresh = page.last_answer()
    assert same_text(fresh["text"], expected.text) and len(page.answers()) == 1
    check_usage(fresh["usage"], expected)  # only the system prompt and this question: nothing from before
    page.open(keep_settings=True)  # a reload keeps the settings and the conversation
    values = page.js("return ['max-tokens', 'system', 'temperature-auto'].map((id) => {"
                     "const e = document.getElementById(id); return e.type === 'checkbox' ? e.checked : e.value})")
    assert values == ["6", "Answer briefly.", False]
    assert [a["text"] for a in page.answers()] == [fresh["text"]] and page.find(".regenerate")
    assert page.answers()[0]["usage"] == fresh["usage"]  # its token counts and speed, as before the reload
    assert page.js("return document.querySelector('.message.user .content').textContent") == QUESTION
    page.send("And the other one?")  # the kept exchange goes with the next question
    follow_up = page.last_answer()
    check_usage(follow_up["usage"], greedy(tiny_chat_model, [
        {"role": "system", "content": "Answer briefly."}, {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": expected.text}, {"role": "user", "content": "And the other one?"}], [], 6))
    page.find("#new-chat").click()
    page.open(keep_settings=True)  # New chat is kept too: nothing comes back
    assert page.answers() == [] and page.js("return !document.getElementById('empty').hidden")
    # a conversation over the browser's quota (about 5 million characters) is not kept, and the page says so
    page.js("state.turns.push({role: 'user', text: 'x'.repeat(6e6), images: []}); saveChat()")
    assert "too large" in page.find("#notice").text and page.js("return sessionStorage.length") == 0


@pytest.mark.slow
def test_key_and_busy_errors_are_shown_and_the_page_recovers(browser, serve, tmp_path):
    keyed = Page(browser, serve(api_key="s3cret", **SETTINGS).url, tmp_path).open()
    assert keyed.js("return !document.getElementById('api-key-field').hidden")  # the server wants a key
    key_help = "return document.getElementById('api-key-help').textContent"
    assert keyed.js(key_help) == "This server needs an API key."
    keyed.settings(max_tokens=2, api_key="wrong")
    keyed.wait(f"({key_help.removeprefix('return ')}) === 'The server refused this key.'")
    keyed.attach_file(solid_png((200, 30, 30)), "red.png")
    keyed.thumbnails_ready(1)
    keyed.send(QUESTION)
    refused = keyed.last_answer()
    assert refused["state"] == "error" and "401 authentication_error" in refused["error"], refused
    assert "API key in Settings" in refused["error"]
    # back in the box to edit and send again: the text and its image; the error in sight below them
    assert keyed.js("return document.getElementById('prompt').value") == QUESTION
    keyed.thumbnails_ready(1)
    assert keyed.js("const box = document.querySelector('.error').getBoundingClientRect(); const log = "
                    "document.getElementById('messages').getBoundingClientRect(); return box.bottom <= log.bottom + 1")
    keyed.settings(api_key="s3cret")
    keyed.wait(f"({key_help.removeprefix('return ')}) === ''")  # the models list answered with the key
    keyed.find(".regenerate").click()  # retries the refused question, now with the key
    assert keyed.last_answer()["state"] == "done" and len(keyed.answers()) == 1
    # asked again as it was, the question is no longer a draft: the box and the attachments are empty
    assert keyed.js("return [document.getElementById('prompt').value, state.attached.length]") == ["", 0]

    busy = serve(max_concurrency=1, max_queue=0)
    page = Page(browser, busy.url, tmp_path).open()
    page.settings(max_tokens=2)
    release = threading.Event()

    def occupy() -> None:  # one long answer holds the only slot until released
        body = {"model": "x", "max_tokens": 400, "stream": True, "messages": [{"role": "user", "content": "Hi"}]}
        with httpx.stream("POST", f"{busy.url}/v1/messages", json=body, timeout=60) as response:
            for _ in response.iter_lines():
                if release.is_set():
                    return

    worker = threading.Thread(target=occupy, daemon=True)
    worker.start()
    deadline = time.time() + 20
    while not httpx.get(f"{busy.url}/health").json()["running"]:
        assert time.time() < deadline and worker.is_alive(), "the long request did not start"
        time.sleep(0.02)
    page.send(QUESTION)
    overloaded = page.last_answer()
    assert overloaded["state"] == "error" and "529 overloaded_error" in overloaded["error"], overloaded
    release.set()
    worker.join(timeout=20)
    deadline = time.time() + 10
    while httpx.get(f"{busy.url}/health").json()["running"]:
        assert time.time() < deadline, "the long request did not end"
        time.sleep(0.05)
    page.find(".regenerate").click()
    assert page.last_answer()["state"] == "done"


@pytest.mark.slow
def test_a_conversation_over_the_context_forgets_its_oldest_exchanges_and_goes_on(page, tiny_chat_model):
    """Like the REPL and ChatSession: once the whole conversation no longer fits the tiny model's 512 tokens, the page
    leaves out its oldest exchanges and asks again (the server answers 400 first), and says so in the chat. A message
    too long on its own still shows the server's error, and forgets nothing."""
    long = " ".join(["word"] * 50)  # about 200 tokens: two exchanges fit, three do not
    page.settings(max_tokens=4, greedy=True)

    def sent_tokens() -> int:  # the prompt the page should now send: its remembered turns, as the server merges them
        turns = page.js("return state.turns.filter((t) => !t.failed && !t.forgotten && t.text.trim())"
                        ".map((t) => ({role: t.role, content: t.text}))")
        merged = []  # the random model's greedy answers are blank, so not sent: the questions follow each other
        for turn in turns:
            if merged and merged[-1]["role"] == turn["role"]:
                merged[-1]["content"] += "\n\n" + turn["content"]
            else:
                merged.append(turn)
        return tiny_chat_model.prepare(merged).input_tokens

    notes = []
    for i in range(4):
        page.send(f"Question {i}: {long}")
        page.wait(f"document.querySelectorAll('.message.assistant').length === {i + 1}")
        answer = page.last_answer()
        assert answer["state"] == "done", answer
        assert answer["usage"].startswith(f"{sent_tokens()} in · "), answer["usage"]  # what was sent, exactly
        notes.append(page.js("return document.querySelectorAll('.message.assistant')[arguments[0]]"
                             ".querySelector('.context-note')?.textContent || ''", i))
    assert notes[:2] == ["", ""] and all("Older messages left out" in note for note in notes[2:]), notes
    assert "oldest exchange is forgotten" in notes[2]  # one exchange each time
    forgotten = page.js("return [...document.querySelectorAll('.message')]"
                        ".map((m) => m.classList.contains('forgotten'))")
    assert forgotten == [True] * 4 + [False] * 4  # shown, and marked: the first two questions and their answers
    opacity = "return [...document.querySelectorAll('.message.forgotten' + arguments[0])].map((e) => " \
              "getComputedStyle(e).opacity)"
    # the text is dimmed, not the small usage line beside it
    assert set(page.js(opacity, "")) == {"1"} and set(page.js(opacity, " .content")) == {"0.7"}
    assert page.js("return state.turns.filter((t) => t.forgotten).length") == 4

    page.send(" ".join(["word"] * 150))  # over the context by itself: the error, as before, and nothing forgotten
    page.wait("document.querySelectorAll('.message.assistant').length === 5")
    failed = page.last_answer()
    assert failed["state"] == "error" and "more than the model's context" in failed["error"], failed
    assert page.js("return state.turns.filter((t) => t.forgotten).length") == 4
    assert page.js("return document.querySelectorAll('.context-note').length") == 2
    assert page.js("return document.getElementById('prompt').value") == " ".join(["word"] * 150)  # back, to edit
    page.find("#prompt").clear()
    page.send(QUESTION)  # the chat goes on, with the two exchanges it still remembers; it takes the refused one's place
    page.wait("!document.querySelector('.message.failed') && document.querySelectorAll('.message.assistant').length "
              "=== 5")
    answer = page.last_answer()
    assert answer["state"] == "done" and answer["usage"].startswith(f"{sent_tokens()} in · "), answer
    assert sent_tokens() > tiny_chat_model.prepare([{"role": "user", "content": QUESTION}]).input_tokens + 300

    # fits the context, but leaves the answer less than its room (max_tokens, at most a quarter of the context): the
    # oldest exchange is forgotten before asking, as ChatSession does, rather than the answer being cut short
    page.settings(max_tokens=128, greedy=True)
    page.send(QUESTION)
    page.wait("document.querySelectorAll('.message.assistant').length === 6")
    answer = page.last_answer()
    assert answer["state"] == "done" and answer["usage"].startswith(f"{sent_tokens()} in · "), answer
    assert page.js("return state.turns.filter((t) => t.forgotten).length") > 4
    assert sent_tokens() + 128 <= tiny_chat_model.context_length
    forgotten = "return [...document.querySelectorAll('.message')].map((m) => m.classList.contains('forgotten'))"
    dimmed = page.js(forgotten)
    page.open(keep_settings=True)  # a reload keeps which messages are forgotten: still dimmed, and still not sent
    assert page.js(forgotten) == dimmed and page.js("return state.turns.filter((t) => t.forgotten).length") > 4


@pytest.mark.slow
def test_kv_cache_setting_chooses_the_cache_each_request_uses(browser, serve, tmp_path, tiny_chat_model):
    """The setting's choice goes with each request (the server's default otherwise), and a reload keeps it. On a
    budget of 3 tokens the random model's greedy answer under H2O differs from the full cache's: the text shows which
    cache ran."""
    budget = {"heavy": 1, "recent": 1, "sinks": 1}
    page = Page(browser, serve(h2o=H2OSettings(**budget), **SETTINGS).url, tmp_path).open()
    messages = [{"role": "user", "content": QUESTION}]
    full = greedy(tiny_chat_model, messages, [], 12)
    h2o = tiny_chat_model.generate(messages, [], max_new_tokens=12, temperature=0, kv_cache="h2o", h2o=budget)
    assert not same_text(full.text, h2o.text)  # the page's choice is visible in the answer
    page.settings(max_tokens=12, greedy=True)
    page.find("#settings-toggle").click()
    help_text = "return document.getElementById('kv-cache-help').textContent"
    assert page.find("#kv-cache-default").text == "The server's default (full)" and page.js(help_text) == \
        "Keeps every past token."
    from selenium.webdriver.support.select import Select

    Select(page.find("#kv-cache")).select_by_value("h2o")
    assert page.js(help_text).startswith("Keeps the first 1 token, the 1 token most attended to and the newest 1 token")
    page.find("#settings-close").click()
    page.send(QUESTION)
    assert same_text(page.last_answer()["text"], h2o.text)
    page.open(keep_settings=True)  # kept across a reload
    assert page.js("return document.getElementById('kv-cache').value") == "h2o"
    page.find("#settings-toggle").click()
    Select(page.find("#kv-cache")).select_by_value("dynamic")
    page.find("#settings-close").click()
    page.find(".regenerate").click()
    assert same_text(page.last_answer()["text"], full.text)


class FailingStream(ScriptedStream):
    """A model that fails after a few words (out of memory, say): the server ends the stream with an error event."""

    def __iter__(self):
        yield from self.pieces
        raise RuntimeError("the GPU ran out of memory")


@pytest.mark.slow
def test_an_error_after_the_first_words_is_shown_as_an_error_not_an_answer(page, live, monkeypatch):
    monkeypatch.setattr(live.app.state.server.chat, "stream",
                        lambda prompt, cancel=None, **options: FailingStream(prompt, ["Partly ", "said"]))
    page.send("Tell me a story")
    failed = page.last_answer()
    assert failed["state"] == "error" and "the GPU ran out of memory" in failed["error"], failed
    assert "api_error" in failed["error"] and failed["usage"] == ""  # no token counts for an answer that broke
    assert page.js("return document.getElementById('prompt').value") == "Tell me a story"  # back, to send again
    assert page.js("return state.turns.filter((t) => t.role === 'assistant').length") == 0  # not part of the chat
