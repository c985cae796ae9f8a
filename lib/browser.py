"""A pycortex WebGL viewer in headless Chromium: the folder served on 127.0.0.1, the page opened with
software WebGL (SwiftShader), the brain waited for, a map shown and its picture taken, and every
message of the page's console kept.

Used by viewer.py (--screenshot: the README's picture) and tests/test_viewer.py (the viewer checked
in a real browser). Needs the playwright package (requirements.txt) to drive a Chromium, Debian's
`chromium` (`apt-get install chromium`; or $CHROMIUM, a path): playwright's own browser download is
not used. The page is waited for, not a timer: Chromium's own --screenshot fires while the page
still says "Loading brain...".
"""
import base64
import contextlib
import functools
import http.server
import io
import json
import os
import shutil
import threading

from lib.plumbing import StudyError

# headless Chromium in a container: no sandbox, no network of its own, WebGL on the CPU (SwiftShader)
FLAGS = ["--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# pycortex's page: the viewer exists, its surfaces are loaded and so is the map it shows
LOADED = ("() => window.viewer !== undefined && viewer.loaded && viewer.loaded.state() === 'resolved'"
          " && viewer.active && viewer.active.loaded.state() === 'resolved'")


def chromium():
    """The Chromium to drive: $CHROMIUM, else `chromium` on PATH (Debian's package)."""
    path = os.environ.get("CHROMIUM") or shutil.which("chromium")
    if not path or not os.path.exists(path):
        raise StudyError("no Chromium found: install Debian's (`apt-get install chromium`) or set "
                         "CHROMIUM=/path/to/chromium")
    return path


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # one line per file fetched: noise
        pass


@contextlib.contextmanager
def served(folder):
    """`folder` served over HTTP on 127.0.0.1 (a free port) while inside; yields its address."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=folder))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/"
    finally:
        server.shutdown()
        server.server_close()


class Page:
    """The viewer's page: its maps' names, a map shown, the canvas's picture, the console's messages."""

    def __init__(self, page, messages):
        self.page, self.messages = page, messages

    def names(self):
        """The maps, in the viewer's order (the first is the one it opens on)."""
        return self.page.evaluate("() => $('#datasets li').map((i, e) => $(e).text()).get()")

    def show(self, name, mix=0.5):
        """Show the map `name` on the brain at `mix` (0: folded, 0.5: inflated, 1: flat), once drawn."""
        self.page.evaluate("([name, mix]) => { viewer.setData(name); viewer.setMix(mix); viewer.schedule(); }",
                           [name, mix])
        self.page.wait_for_function(LOADED + " && viewer.active.name === " + json.dumps(name))
        return self.picture()

    def picture(self, path=None, tries=20):
        """The brain as pycortex drew it, an RGB array of the WebGL canvas's own pixels (not the
        name and colour scale laid over it), taken once two readings in a row agree (the brain is
        drawn, not being drawn); `path`: the whole page, name and colour scale too, saved there."""
        import matplotlib.image
        last = None
        for _ in range(tries):
            self.page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
            now = self.page.evaluate("() => document.getElementById('brain').toDataURL('image/png')")
            if now == last:
                break
            last = now
        if path:
            self.page.screenshot(path=path)
        return matplotlib.image.imread(io.BytesIO(base64.b64decode(last.split(",", 1)[1])), format="png")[..., :3]


@contextlib.contextmanager
def opened(folder, size=(1100, 750), timeout_s=240):
    """A viewer folder (index.html, as cortex.webgl.make_static writes it) served and opened in
    headless Chromium, its brain loaded; yields a Page."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        raise StudyError("the playwright package is not installed: `pip install playwright` (requirements.txt)")
    with served(folder) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=FLAGS)  # a fresh profile each time
        try:
            page = browser.new_page(viewport=dict(width=size[0], height=size[1]))
            messages = []
            page.on("console", lambda m: messages.append(f"{m.type}: {m.text} [{m.location.get('url', '')}]"))
            page.on("pageerror", lambda e: messages.append(f"pageerror: {e}"))
            page.goto(url + "index.html")
            page.wait_for_function(LOADED, timeout=timeout_s * 1000)
            yield Page(page, messages)
        finally:
            browser.close()


def screenshot(folder, path, mix=0.5):
    """The picture of the map the viewer opens on, at `mix` (inflated), saved at `path`; returns the
    console's messages."""
    with opened(folder) as page:
        page.show(page.names()[0], mix)
        page.picture(path)
        return list(page.messages)
