"""The listening pages in a real browser: headless Chromium (Debian's `chromium`; .ci/run installs
it) opens a page sample.py wrote and reports whether every image loaded and every <audio> element
reached a finite duration > 0 (the browser could decode the WAV). Skipped where Chromium is absent."""
import html
import json
import os
import re
import shutil
import subprocess

import pytest
import torch

from nanosuno.codec import load_codec
from test_sample import run_sample, save_tiny_checkpoint

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

# appended to a copy of the page: once it has loaded, load every audio element's metadata and write
# what the browser found into the body's data-check attribute, which --dump-dom prints
CHECK = """<script>
window.addEventListener('load', async () => {
  const images = [...document.images].map(i => i.complete && i.naturalWidth > 0);
  const durations = await Promise.all([...document.querySelectorAll('audio')].map(a => new Promise(done => {
    a.addEventListener('loadedmetadata', () => done(a.duration));
    a.addEventListener('error', () => done(-1));
    a.preload = 'auto';
    a.load();
  })));
  document.body.setAttribute('data-check', JSON.stringify({images, durations}));
});
</script>"""


def browse(page, profile):
    """{images: [loaded?], durations: [seconds]} of a page as headless Chromium loads it."""
    checked = os.path.join(os.path.dirname(page), "checked.html")
    with open(page) as f, open(checked, "w") as out:
        out.write(f.read().replace("</body>", CHECK + "</body>"))
    # Up to 3 tries: the audio elements load in real time, outside the virtual-time budget, so on a busy
    # machine Chromium can dump the page before they report (seen once in CI; the next try passed)
    for _ in range(3):
        result = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                                 "--no-first-run", "--disable-background-networking", "--disable-component-update",
                                 "--disable-sync", f"--user-data-dir={profile}", "--virtual-time-budget=10000",
                                 "--allow-file-access-from-files", "--dump-dom", f"file://{os.path.abspath(checked)}"],
                                capture_output=True, text=True, timeout=120)
        found = re.search(r'data-check="([^"]*)"', result.stdout)
        if found:
            return json.loads(html.unescape(found.group(1)))
    raise AssertionError(f"the page never finished loading in Chromium (3 tries): {result.stderr[-500:]}")


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium): no browser to "
                                             "open the listening pages in")
def test_a_sample_page_plays_and_shows_everything_in_a_browser(tmp_path):
    codec = load_codec("untrained")
    # with a val excerpt, as train.py stores one
    out_dir = save_tiny_checkpoint(tmp_path / "out", codec, K=2, reference_codes=torch.randint(0, 1024, (2, 75)))
    run = run_sample(out_dir, "--seconds=0.5", "--num_samples=2")
    found = browse(os.path.join(run, "index.html"), tmp_path / "profile")
    assert found["images"] == [True, True, True]                     # the reference and the two samples
    assert len(found["durations"]) == 3 and all(0 < d < 2 for d in found["durations"]), found
    assert found["durations"][1:] == pytest.approx([38 * 320 / 24000] * 2, abs=1e-3)
    assert found["durations"][0] == pytest.approx(1.0, abs=1e-3)     # 75 frames
