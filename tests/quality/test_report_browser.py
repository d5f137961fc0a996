"""report.html: self-contained, and its plots really show in a browser (headless Chromium, offline).

Needs Debian's `chromium` package (`apt-get install -y chromium`); .ci/run installs it.
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from jobs.index_quality import main
from pipeline.quality.report import CAVEAT

PLOTS = ["Measures over nights", "Tonight vs last night by segment (nDCG@10)", "Histogram of reranker scores",
         "Retriever vs reranker agreement"]


@pytest.fixture(scope="module")
def report(dl19_long, dl19_qrels, tmp_path_factory) -> Path:
    """report.html of the second of two nights: history, segments and a judge, so every plot has data."""
    root = tmp_path_factory.mktemp("report")
    for night in ("2024-05-01", "2024-05-02"):
        assert main(["--run", str(dl19_long), "--qrels", str(dl19_qrels), "--output", str(root / night),
                     "--history", str(root / "history"), "--set", f"night={night}",
                     "--set", "input.judge_score_column=reranker_score", "--set", "segment_columns=[query_type]",
                     "--set", "metrics.relevance_level=2"]) == 0
    return root / "2024-05-02" / "report.html"


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    raise RuntimeError("no Chromium found: install it (Debian: apt-get install -y chromium) to run the report test")


def _headless(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / "chromium-profile"  # fresh per call: no state leaks between runs
    return subprocess.run(
        [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-extensions", f"--user-data-dir={profile}", *args],
        capture_output=True, text=True, timeout=120,
    )


class _Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.external, self.tags = [], [], set()

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs)
        for name in ("src", "href"):
            if attrs.get(name) and not attrs[name].startswith("data:"):
                self.external.append(attrs[name])


def test_report_is_self_contained_with_decodable_pngs(report):
    text = report.read_text(encoding="utf-8")
    page = _Collector()
    page.feed(text)
    assert page.external == [] and not ({"script", "link", "iframe"} & page.tags)
    assert [img["alt"] for img in page.images] == PLOTS
    for img in page.images:
        prefix = "data:image/png;base64,"
        assert img["src"].startswith(prefix)
        picture = Image.open(io.BytesIO(base64.b64decode(img["src"][len(prefix):])))
        assert picture.format == "PNG" and picture.width > 300 and picture.height > 200
    assert CAVEAT.split(":")[0] in text.replace("&quot;", '"')  # the self-flattering judge caveat is shown


def test_plots_are_visible_in_headless_chromium(report, tmp_path):
    # A copy of the page with a probe that reports, once loaded, how the browser decoded and laid out each image.
    probe = """<script>
    window.addEventListener("load", () => {
      const seen = [...document.images].map(i => ({alt: i.alt, complete: i.complete, naturalWidth: i.naturalWidth,
        naturalHeight: i.naturalHeight, shownWidth: i.getBoundingClientRect().width,
        shownHeight: i.getBoundingClientRect().height}));
      const out = document.createElement("pre"); out.id = "probe"; out.textContent = JSON.stringify(seen);
      document.body.appendChild(out);
    });
    </script>"""
    page = tmp_path / "probe.html"
    page.write_text(report.read_text(encoding="utf-8").replace("</body>", probe + "</body>"), encoding="utf-8")
    result = _headless(tmp_path, "--virtual-time-budget=10000", "--dump-dom", page.as_uri())
    match = re.search(r'<pre id="probe">(.*?)</pre>', result.stdout, re.S)
    assert match, f"the page did not finish loading in Chromium: {result.stderr[-2000:]}"
    seen = json.loads(match.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert [image["alt"] for image in seen] == PLOTS
    for image in seen:
        assert image["complete"] and image["naturalWidth"] > 300 and image["naturalHeight"] > 200, image
        assert image["shownWidth"] > 300 and image["shownHeight"] > 200, image

    # And the rendered page is not blank: a screenshot of the top holds the trend plot's lines and labels.
    shot = tmp_path / "shot.png"
    result = _headless(tmp_path, "--window-size=1100,1800", f"--screenshot={shot}", report.as_uri())
    assert shot.exists(), result.stderr[-2000:]
    pixels = Image.open(shot).convert("RGB")
    colours = pixels.getcolors(maxcolors=1 << 20)
    non_white = sum(count for count, rgb in colours if min(rgb) < 240) / (pixels.width * pixels.height)
    assert len(colours) > 100 and non_white > 0.05  # a near-blank page with one line of text: ~0.0002
