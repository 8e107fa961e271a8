"""The chat page in a real headless Chromium (Debian's /usr/bin/chromium, driven by playwright):
upload a PNG, ask, ask a follow-up; the answers streamed into the page equal the API's."""

import os

import pytest

from tests.serve_fixtures import API_KEY, client, data_url, png_bytes, server  # noqa: F401

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} missing (apt-get install chromium)")


def test_page_streams_the_api_answer(server, client, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api")
    raw = png_bytes(7)
    path = tmp_path / "scan.png"
    path.write_bytes(raw)
    q1, q2 = "这张图像属于哪种检查方式？", "What else do you see?"
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            page = browser.new_page()
            page.goto(server.base_url + "/")
            page.click("summary")  # the settings
            page.fill("#api-key", API_KEY)
            page.dispatch_event("#api-key", "change")
            page.wait_for_function("document.getElementById('status').textContent.startsWith('ready')")
            page.set_input_files("#image-file", str(path))
            page.wait_for_selector("#preview:not([hidden])")
            assert page.get_attribute("#preview", "src").startswith("data:image/png;base64,")
            answers = []
            for i, q in enumerate((q1, q2)):
                page.fill("#question", q)
                page.click("#send")
                page.wait_for_selector(f".msg.assistant >> nth={i}", state="attached")
                page.wait_for_function(
                    f"document.querySelectorAll('.msg.assistant')[{i}].dataset.done === '1'", timeout=120_000
                )
                answers.append(page.locator(".msg.assistant").nth(i).text_content())
            assert page.locator(".msg.error").count() == 0
        finally:
            browser.close()
    msgs = [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": data_url(raw)}}, {"type": "text", "text": q1}],
        }
    ]
    first = client.chat.completions.create(model="qilin-med-vl", messages=msgs, temperature=0)
    assert answers[0] == first.choices[0].message.content
    msgs += [{"role": "assistant", "content": answers[0]}, {"role": "user", "content": q2}]
    second = client.chat.completions.create(model="qilin-med-vl", messages=msgs, temperature=0)
    assert answers[1] == second.choices[0].message.content
