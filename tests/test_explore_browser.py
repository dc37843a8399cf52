"""explore.py's page in a real browser: headless Chromium loads it, types a prompt, moves the temperature
slider and sees the bars change, clicks a token and sees it appended, opens the attention panel and sees a
heat map drawn, then saves a screenshot. Any JavaScript error fails the test.

Needs Debian's Chromium (`apt-get install chromium`; .ci/run installs it) and Playwright (requirements-dev.txt),
which drives that Chromium (Playwright's own browser download needs the internet); skips, saying what is
missing, without them.

    python -m pytest -q tests/test_explore_browser.py
    # the screenshot in docs/LEARNING_PATH.md: the smoke checkpoint instead of the test's tiny one
    EXPLORE_CKPT=checkpoints/final.ckpt EXPLORE_SCREENSHOT=docs/images/explore.png python -m pytest -q tests/test_explore_browser.py
"""

import os
import shutil
from pathlib import Path

import pytest

from test_explore import start_server, stop_server

CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--no-proxy-server"]


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM:
        pytest.skip("Chromium not found: apt-get install chromium (Debian), or set CHROMIUM=/path/to/chrome")
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright missing: pip install -r requirements-dev.txt")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def bar_numbers(page) -> list[str]:
    return page.locator("#bars .num").all_inner_texts()


def until(page, condition, seconds: float = 15.0):
    """Wait for condition() to hold, asking from Python (the page's Content-Security-Policy forbids the
    string evaluation Playwright's wait_for_function uses, and that is the point of the policy)."""
    for _ in range(int(seconds / 0.05)):
        if condition():
            return
        page.wait_for_timeout(50)
    raise AssertionError(f"timed out waiting for {condition.__doc__ or 'the page'}")


def test_the_page_draws_bars_sliders_tokens_and_attention(browser, tiny_ckpt, tmp_path):
    ckpt = os.environ.get("EXPLORE_CKPT") or tiny_ckpt
    screenshot = Path(os.environ.get("EXPLORE_SCREENSHOT") or tmp_path / "explore.png")
    process, port = start_server("--ckpt", ckpt, "--port", 0)
    errors = []
    try:
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
        page.goto(f"http://127.0.0.1:{port}/")
        page.wait_for_selector("#bars .bar-row")

        page.fill("#prompt", "The cat sat on the")  # typing: the server tokenizes it (5 tokens)
        until(page, lambda: page.inner_text("#prompt-info").startswith("5 tokens"))
        before = bar_numbers(page)
        page.locator("#slider-temperature").fill("2.5")  # flatter: the top token loses probability
        until(page, lambda: bar_numbers(page) != before)
        after = bar_numbers(page)
        assert after != before and float(after[0].rstrip("%")) < float(before[0].rstrip("%"))
        assert "off" not in page.locator("#stages li").nth(2).inner_text()  # the temperature stage is on

        top = page.locator("#bars .piece").first
        token_id = top.get_attribute("title").split()[2].rstrip(";")
        top.click()  # append the most likely token
        until(page, lambda: page.inner_text("#prompt-info").startswith("6 tokens"))
        text = page.input_value("#prompt")
        assert text.startswith("The cat sat on the") and len(text) > len("The cat sat on the")
        assert page.evaluate("state.ids.length") == 6 and str(page.evaluate("state.ids[5]")) == token_id

        page.click("#tokens-panel > summary")
        page.wait_for_selector("#token-view .token")
        assert page.locator("#token-view .token").count() == 7  # 6 tokens and the end of the text
        page.click("#attention-panel > summary")
        until(page, lambda: page.evaluate("document.getElementById('heatmap').width") > 10)
        colours = page.evaluate("""() => {
            const canvas = document.getElementById('heatmap');
            const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
            let masked = 0, weights = 0;
            for (let k = 0; k < data.length; k += 4) {
              if (data[k] === 228 && data[k + 1] === 231 && data[k + 2] === 234) masked++;  // exactly 0
              else if (data[k + 3] === 255 && data[k + 2] > data[k]) weights++;            // shades of blue
            }
            return {masked, weights};
        }""")
        assert colours["masked"] > 0 and colours["weights"] > 0, colours  # the causal zeros and the weights
        page.hover("#heatmap", position={"x": 150, "y": 150})
        assert "query" in page.inner_text("#attention-detail")

        # A typical setting for the picture: a little sharper, and top-k cutting the tail (greyed bars)
        page.locator("#slider-temperature").fill("0.8")
        page.locator("#slider-top_k").fill("12")
        until(page, lambda: page.locator("#bars .bar-row.removed").count() > 0)
        page.wait_for_timeout(300)  # let the last answers land before the picture
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(screenshot), full_page=True)
        assert 0 < screenshot.stat().st_size < 500_000
    finally:
        code, err = stop_server(process)
    assert errors == [], errors
    assert code == 0 and "Traceback" not in err
