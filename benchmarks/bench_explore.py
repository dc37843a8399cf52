"""How fast the explorer answers: moving a slider, next-token bars for a fresh prompt, loading the page.

Examples (from the repository root, after `python train.py --config config_smoke.yaml`):

    python benchmarks/bench_explore.py --ckpt checkpoints/final.ckpt
    python benchmarks/bench_explore.py --ckpt checkpoints/final.ckpt --repeats 31 --browser /usr/bin/chromium
    python benchmarks/bench_explore.py --ckpt checkpoints/final.ckpt --threads 2

It starts `python explore.py --ckpt CKPT --port 0` as a user would, then times over HTTP:
  - slider: /api/next on the same text, the temperature moved each time. The logits are cached, so this is
    re-filtering (process_logits, stage by stage), the summaries and the JSON. Worst case: top-p on, every
    other filter off, so top-p sorts the whole vocabulary; also timed with every filter off;
  - next-token bars: /api/next on a fresh --prompt-tokens-token prompt each time (a full forward pass);
  - page load: GET /, explore.css, explore.js, /api/info and the first /api/next, one after another (a
    browser fetches some of them in parallel, so this is an upper bound); with --browser, also a headless
    Chromium's time from navigation to the first bars drawn (needs Playwright: requirements-dev.txt).
Server times come from the Server-Timing header explore.py sends; medians (min-max) of --repeats runs.
Targets (issue 17): slider < 50 ms of server time, bars < 200 ms, page load < 1 s.
"""

import argparse
import http.client
import json
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tokenizer import load_tokenizer  # noqa: E402  (after the path line, so the script runs from anywhere)


def start_server(ckpt: str, threads: int) -> tuple[subprocess.Popen, int]:
    process = subprocess.Popen([sys.executable, "explore.py", "--ckpt", ckpt, "--port", "0", "--threads", str(threads)], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = process.stdout.readline()
    match = re.search(r"http://[\d.]+:(\d+)/", line)
    if not match:
        sys.exit(f"explore.py did not start: {process.stderr.read().strip()}")
    return process, int(match.group(1))


def timed(port: int, method: str, path: str, body=None) -> tuple[float, float | None, bytes]:
    """(client seconds, server milliseconds or None, response body) of one request."""
    started = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    payload = None if body is None else json.dumps(body).encode()
    connection.request(method, path, body=payload, headers={"Content-Type": "application/json"} if payload else {})
    response = connection.getresponse()
    data = response.read()
    seconds = time.perf_counter() - started
    connection.close()
    if response.status != 200:
        sys.exit(f"{path}: HTTP {response.status}: {data.decode()}")
    timing = response.getheader("Server-Timing")
    return seconds, float(timing.split("dur=")[1]) if timing else None, data


def summary(values: list[float], unit: str = "ms") -> str:
    return f"{statistics.median(values):.1f} {unit} ({min(values):.1f}-{max(values):.1f})"


def browser_load(port: int, chromium: str, repeats: int) -> list[float]:
    """Milliseconds from navigation to the first next-token bars, in a fresh headless Chromium page each time."""
    from playwright.sync_api import sync_playwright

    times = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=[
            "--no-sandbox", "--headless", "--disable-gpu", "--no-proxy-server", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        for _ in range(repeats):
            page = browser.new_page()
            started = time.perf_counter()
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_selector("#bars .bar-row")
            times.append((time.perf_counter() - started) * 1000)
            page.close()
        browser.close()
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="checkpoints/final.ckpt", help="checkpoint to serve")
    p.add_argument("--repeats", type=int, default=21, help="timed runs of each kind (median reported)")
    p.add_argument("--prompt-tokens", "--prompt_tokens", type=int, default=64,
                   help="prompt length for the next-token bars (at most the model's max_seq_len)")
    p.add_argument("--browser", default=None, metavar="CHROMIUM", help="also time a real page load in this Chromium")
    p.add_argument("--threads", type=int, default=1, help="explore.py --threads")
    args = p.parse_args(argv)

    tokenizer = load_tokenizer("gpt2")
    corpus = tokenizer.encode((ROOT / "data" / "tiny_corpus.txt").read_text())
    process, port = start_server(args.ckpt, args.threads)
    try:
        timed(port, "GET", "/api/info")  # warm-up: first calls allocate
        prompt = corpus[:args.prompt_tokens]
        for k in range(3):
            timed(port, "POST", "/api/next", {"ids": corpus[100 + k:100 + k + args.prompt_tokens]})

        results = {}
        for name, extra in (("slider, top-p over the whole vocabulary", {"top_p": 0.9}), ("slider, filters off", {})):
            server = []
            for k in range(args.repeats):
                settings = {**extra, "temperature": round(0.5 + 0.05 * k, 2)}
                server.append(timed(port, "POST", "/api/next", {"ids": prompt, "settings": settings})[1])
            results[name] = summary(server)

        client, server = [], []
        for k in range(args.repeats):
            ids = corpus[200 + 7 * k:200 + 7 * k + args.prompt_tokens]  # a new text: nothing cached
            seconds, ms, _ = timed(port, "POST", "/api/next", {"ids": ids, "settings": {"top_k": 50, "top_p": 0.95}})
            client.append(seconds * 1000)
            server.append(ms)
        results[f"next-token bars, fresh {args.prompt_tokens}-token prompt (server)"] = summary(server)
        results[f"next-token bars, fresh {args.prompt_tokens}-token prompt (round trip)"] = summary(client)

        loads = []
        for k in range(args.repeats):
            started = time.perf_counter()
            for path in ("/", "/explore.css", "/explore.js", "/api/info"):
                timed(port, "GET", path)
            timed(port, "POST", "/api/next", {"text": f"The model {k}"})
            loads.append((time.perf_counter() - started) * 1000)
        results["page load, its 5 requests one after another"] = summary(loads)
        if args.browser:
            results["page load in headless Chromium, navigation to first bars"] = summary(browser_load(
                port, args.browser, args.repeats))
    finally:
        process.send_signal(signal.SIGINT)
        process.communicate(timeout=30)

    print(f"explore.py --threads {args.threads} on {args.ckpt}, medians (min-max) of {args.repeats}:")
    for name, value in results.items():
        print(f"  {name:<62} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
