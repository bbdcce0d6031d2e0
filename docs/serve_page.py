"""Make docs/serve_page.png: `vlp serve MODEL` on a free loopback port, its page opened in the
distribution's headless chromium (playwright), an image dropped on it, the screenshot taken
once the caption (and the zero-shot bars and answer, where the model serves them) are shown.

    python docs/serve_page.py MODEL IMAGE [--out docs/serve_page.png] [--labels "a, b, c"]

MODEL is what `vlp serve` takes (e.g. the run directory of `vlp demo --family coca`); IMAGE is
a file on disk (e.g. one of the demo's held-out images). Needs the serve and test extras and
/usr/bin/chromium. The PNG is reduced to a 256-colour palette to keep it small.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from PIL import Image

CHROMIUM = "/usr/bin/chromium"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("image")
    parser.add_argument("--out", default=str(Path(__file__).parent / "serve_page.png"))
    parser.add_argument("--labels", help="zero-shot labels, comma-separated")
    parser.add_argument("--question", help="question for a model that answers them")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "vlp", "serve", args.model, "--port",
                               str(port), "--log-level", "warning"])
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(url + "/v1/health", timeout=2).read()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("vlp serve did not start") from None
                time.sleep(0.5)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                                 args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 900, "height": 700})
            page.goto(url + "/")
            page.wait_for_selector("body[data-ready=true]", timeout=30_000)
            if args.labels and page.is_visible("#labels"):
                page.fill("#labels", args.labels)
            if args.question and page.is_visible("#question"):
                page.fill("#question", args.question)
            page.set_input_files("#file", args.image)
            for box, result in (("#caption-box", "#caption"), ("#zeroshot-box", "#bars"),
                                ("#vqa-box", "#answer")):
                if page.is_visible(box):  # the tasks the model serves
                    page.wait_for_selector(f"{result}[data-done=true]", timeout=60_000)
            page.screenshot(path=args.out, full_page=True)
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    Image.open(args.out).convert("RGB").quantize(256).save(args.out, optimize=True)
    print(f"{args.out}: {Path(args.out).stat().st_size} bytes")


if __name__ == "__main__":
    main()
