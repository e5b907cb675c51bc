"""``report.html`` of a real few-step run of the main job, opened in headless Chromium over HTTP (the Chrome
DevTools Protocol through ``websocket-client``): every resource loads, every video shows a poster frame that is
not blank, and the MP4 files themselves decode to non-blank frames.

Skipped when no Chromium is installed (Debian: ``apt-get install chromium``; ``.ci/run`` installs it).
"""
from __future__ import annotations

import base64
import functools
import io
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (apt-get install chromium)")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--autoplay-policy=no-user-gesture-required", "--mute-audio", "--remote-debugging-port=0"]
MIN_STD = 8.0  # grey levels: a blank (flat) element region is ~0, a digit or noise frame is > 30
WIDTH = 1280

_WAIT_MEDIA = """(async () => {
  const until = (ok, ms) => new Promise(res => { const t0 = Date.now();
    const tick = () => (ok() || Date.now() - t0 > ms) ? res() : setTimeout(tick, 50); tick(); });
  const imgs = [...document.images], vids = [...document.querySelectorAll('video')];
  const posters = await Promise.all(vids.map(v => { const i = new Image(); i.src = v.poster;
    return i.decode().then(() => [i.naturalWidth, i.naturalHeight], () => null); }));
  await until(() => imgs.every(i => i.complete) && vids.every(v => v.readyState >= 1 || v.error), 20000);
  const urls = new Set();
  document.querySelectorAll('[src], [poster], a[href]').forEach(e =>
    ['src', 'poster', 'href'].forEach(a => { if (e.getAttribute(a)) urls.add(new URL(e.getAttribute(a),
      location.href).href); }));
  const fetched = await Promise.all([...urls].map(u => fetch(u).then(r => [u, r.status], e => [u, String(e)])));
  return JSON.stringify({
    images: imgs.map(i => ({src: i.src, ok: i.complete && i.naturalWidth > 0})),
    videos: vids.map((v, k) => ({src: v.currentSrc, poster: posters[k], ready: v.readyState,
                                 error: v.error && v.error.code, duration: v.duration})),
    fetched});
})()"""

_SHOW_FRAMES = """(async () => {
  const vids = [...document.querySelectorAll('video')];
  await Promise.all(vids.map(v => new Promise(res => {
    v.removeAttribute('poster'); v.controls = false; v.preload = 'auto';
    const done = () => res(); v.addEventListener('seeked', done, {once: true});
    v.addEventListener('error', done, {once: true}); setTimeout(done, 15000);
    v.currentTime = 0.3; })));
  await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
  return JSON.stringify(vids.map(v => ({ready: v.readyState, error: v.error && v.error.code,
                                       w: v.videoWidth, h: v.videoHeight})));
})()"""

_RECTS = """JSON.stringify([...document.querySelectorAll('video')].map(v => { const r = v.getBoundingClientRect();
  return [r.left + scrollX, r.top + scrollY, r.width, r.height, v.currentSrc.split('/').slice(-2).join('/')]; }))"""


class DevTools:
    """A minimal Chrome DevTools Protocol client on one page target (commands in order, events kept)."""

    def __init__(self, ws_url: str):
        import websocket  # websocket-client (the dev extra)

        self.ws = websocket.create_connection(ws_url, timeout=60, suppress_origin=True)
        self.next_id, self.events = 0, []

    def __call__(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def wait_for(self, event: str, timeout: float = 30.0) -> dict[str, Any]:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for msg in self.events:
                if msg.get("method") == event:
                    return msg
            self.ws.settimeout(max(0.1, end - time.monotonic()))
            self.events.append(json.loads(self.ws.recv()))
        raise TimeoutError(event)

    def evaluate(self, script: str) -> Any:
        out = self("Runtime.evaluate", expression=script, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in out:
            raise RuntimeError(out["exceptionDetails"])
        return json.loads(out["result"]["value"])

    def screenshot(self) -> Image.Image:
        height = self.evaluate("JSON.stringify(document.documentElement.scrollHeight)")
        self("Emulation.setDeviceMetricsOverride", width=WIDTH, height=min(int(height), 12000),
             deviceScaleFactor=1, mobile=False)
        self.evaluate("new Promise(r => requestAnimationFrame(() => requestAnimationFrame(() => r('0'))))")
        data = self("Page.captureScreenshot", format="png")["data"]
        return Image.open(io.BytesIO(base64.b64decode(data))).convert("L")


@pytest.fixture
def served(av_run):
    """``av_run`` served over HTTP on localhost: yields the base URL."""

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(av_run)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def browser(tmp_path):
    """Headless Chromium with a fresh profile: yields a :class:`DevTools` client on its page."""
    profile = tmp_path / "profile"
    log = open(tmp_path / "chromium.log", "wb")
    proc = subprocess.Popen([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", f"--window-size={WIDTH},900",
                             "about:blank"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        port_file, end = profile / "DevToolsActivePort", time.monotonic() + 30
        while not (port_file.is_file() and port_file.read_text().count("\n") >= 1):
            if proc.poll() is not None or time.monotonic() > end:
                pytest.fail(f"Chromium did not start: {(tmp_path / 'chromium.log').read_text()[-2000:]}")
            time.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        import urllib.request

        for _ in range(100):
            targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10).read())
            pages = [t for t in targets if t.get("type") == "page"]
            if pages:
                break
            time.sleep(0.05)
        devtools = DevTools(pages[0]["webSocketDebuggerUrl"])
        yield devtools
        devtools.ws.close()
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the group of the process started above
            proc.wait(10)
        log.close()


def _region_std(shot: Image.Image, rect: list) -> float:
    """Grey-level standard deviation inside ``rect = [x, y, w, h, name]`` (2 px in from its edges)."""
    x, y, w, h = (round(v) for v in rect[:4])
    return float(np.asarray(shot.crop((x + 2, y + 2, x + w - 2, y + h - 2)), dtype=np.float64).std())


@pytest.mark.slow  # trains through the CLI
def test_report_plays_in_chromium(av_run, served, browser, tmp_path):
    t0 = time.perf_counter()
    cdp = browser
    for domain in ("Network", "Page", "Runtime"):
        cdp(f"{domain}.enable")
    cdp("Emulation.setDeviceMetricsOverride", width=WIDTH, height=900, deviceScaleFactor=1, mobile=False)
    cdp("Page.navigate", url=f"{served}/report.html")
    cdp.wait_for("Page.loadEventFired")
    state = cdp.evaluate(_WAIT_MEDIA)

    bad = [u for u, status in state["fetched"] if status != 200]
    assert not bad, f"resources that do not load: {bad}"
    assert len(state["fetched"]) >= 20  # clips, posters, WAVs, GIF, sheet, charts
    failed = [e["params"] for e in cdp.events if e.get("method") == "Network.loadingFailed"
              and not e["params"].get("canceled")]
    assert not failed, f"failed loads: {failed}"
    errors = [e["params"]["response"]["url"] for e in cdp.events if e.get("method") == "Network.responseReceived"
              and e["params"]["response"]["status"] >= 400]
    assert not errors, f"HTTP errors: {errors}"
    exceptions = [e["params"] for e in cdp.events if e.get("method") == "Runtime.exceptionThrown"]
    assert not exceptions, exceptions
    assert all(i["ok"] for i in state["images"]) and len(state["images"]) >= 3  # GIF, sheet, loss chart
    videos = state["videos"]
    assert len(videos) == 8  # 4 generated + 4 real
    for v in videos:
        assert v["error"] is None and v["ready"] >= 1 and v["duration"] == pytest.approx(1.0, abs=0.15), v
        assert v["poster"] == [128, 128], v  # the poster (first frame, x8) decoded

    # what a reader sees before pressing play (saved), then the poster alone (control bar hidden)
    cdp.screenshot().save(tmp_path / "report_page.png")
    cdp.evaluate("document.querySelectorAll('video').forEach(v => { v.controls = false; }), '0'")
    shot = cdp.screenshot()
    rects = cdp.evaluate(_RECTS)
    assert len(rects) == 8
    for rect in rects:
        assert rect[2] >= 128 and rect[3] >= 128, rect
        assert _region_std(shot, rect) > MIN_STD, f"blank poster: {rect[4]}"

    # the MP4s themselves decode to non-blank frames (H.264 in Chromium)
    frames = cdp.evaluate(_SHOW_FRAMES)
    assert all(f["error"] is None and f["ready"] >= 2 and f["w"] == 128 for f in frames), frames
    shot = cdp.screenshot()
    shot.save(tmp_path / "report_frames.png")
    for rect in cdp.evaluate(_RECTS):
        assert _region_std(shot, rect) > MIN_STD, f"blank video frame: {rect[4]}"
    assert time.perf_counter() - t0 < 60
