"""report.html: self-contained, and what it shows really shows in a browser (headless Chromium, offline).

Two real nights on TREC DL 2019: a first night (a TREC run file and qrels, no history, no reranker) and a
second night with history, a segment column and reranker scores, so every section of the page has data.
Needs Debian's `chromium` package (`apt-get install -y chromium`); .ci/run installs it.
"""

from __future__ import annotations

import base64
import html
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

FIRST_NIGHT_PLOTS = ["Per-query distribution of the judged measures"]
SECOND_NIGHT_PLOTS = [
    "Per-query distribution of the judged measures",
    "Per-query distribution after reranking",
    "Per-query distribution of the label-free measures",
    "Histogram of reranker scores",
    "Retriever vs reranker agreement",
    "Measures over nights",
    "Per-query change since last night (nDCG@10)",
    "By segment (nDCG@10), tonight vs last night",
]
MEASURE_COLUMNS = [
    "measure",
    "mean",
    "95% interval",
    "queries",
    "previous",
    "change",
    "p",
    "paired",
    "verdict",
]
WINDOW_WIDTH = (
    1100  # a laptop browser window; the report's tables must fit it without hiding a column
)


@pytest.fixture(scope="module")
def first_night(shared_data, dl19_qrels, tmp_path_factory) -> Path:
    """report.html of a first night: BM25's TREC run file with qrels, nothing to compare with, no reranker."""
    root = tmp_path_factory.mktemp("first-night")
    assert (
        main(
            [
                "--run",
                str(shared_data / "trec-dl" / "runs" / "BM25_dl19.txt"),
                "--qrels",
                str(dl19_qrels),
                "--output",
                str(root),
                "--set",
                "night=2024-05-01",
                "--set",
                "metrics.relevance_level=2",
            ]
        )
        == 0
    )
    return root / "report.html"


@pytest.fixture(scope="module")
def second_night(dl19_long, dl19_qrels, tmp_path_factory) -> Path:
    """report.html of the second of two nights: history, segments and a judge, so every plot has data."""
    root = tmp_path_factory.mktemp("report")
    for night in ("2024-05-01", "2024-05-02"):
        assert (
            main(
                [
                    "--run",
                    str(dl19_long),
                    "--qrels",
                    str(dl19_qrels),
                    "--output",
                    str(root / night),
                    "--history",
                    str(root / "history"),
                    "--set",
                    f"night={night}",
                    "--set",
                    "input.judge_score_column=reranker_score",
                    "--set",
                    "segment_columns=[query_type]",
                    "--set",
                    "metrics.relevance_level=2",
                ]
            )
            == 0
        )
    return root / "2024-05-02" / "report.html"


@pytest.fixture(params=["first_night", "second_night"])
def report(request) -> tuple[Path, list[str]]:
    """(report.html, the plots it must show) for each night."""
    plots = FIRST_NIGHT_PLOTS if request.param == "first_night" else SECOND_NIGHT_PLOTS
    return request.getfixturevalue(request.param), plots


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    raise RuntimeError(
        "no Chromium found: install it (Debian: apt-get install -y chromium) to run the report test"
    )


def _headless(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / "chromium-profile"  # fresh per call: no state leaks between runs
    return subprocess.run(
        [
            _chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-extensions",
            f"--user-data-dir={profile}",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


def _probe(tmp_path: Path, report: Path, script: str, *args: str) -> object:
    """Open a copy of the report with `script` appended; the script's `window.probe` comes back as JSON."""
    page = tmp_path / "probe.html"
    reporter = """<script>window.addEventListener("load", () => {
      const out = document.createElement("pre"); out.id = "probe"; out.textContent = JSON.stringify(window.probe());
      document.body.appendChild(out);
    });</script>"""
    text = report.read_text(encoding="utf-8")
    page.write_text(
        text.replace("</body>", f"<script>{script}</script>{reporter}</body>"), encoding="utf-8"
    )
    result = _headless(tmp_path, "--virtual-time-budget=10000", *args, "--dump-dom", page.as_uri())
    match = re.search(r'<pre id="probe">(.*?)</pre>', result.stdout, re.S)
    assert match, f"the page did not finish loading in Chromium: {result.stderr[-2000:]}"
    return json.loads(html.unescape(match.group(1)))


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
    path, plots = report
    text = path.read_text(encoding="utf-8")
    page = _Collector()
    page.feed(text)
    assert page.external == [] and not ({"script", "link", "iframe"} & page.tags)
    assert [img["alt"] for img in page.images] == plots
    for img in page.images:
        prefix = "data:image/png;base64,"
        assert img["src"].startswith(prefix)
        picture = Image.open(io.BytesIO(base64.b64decode(img["src"][len(prefix) :])))
        assert picture.format == "PNG" and picture.width > 300 and picture.height > 200
    # The self-flattering judge caveat shows exactly when a reranker judged tonight's run.
    judged = "judge/nDCG@10" in text
    assert judged == (plots is SECOND_NIGHT_PLOTS)
    assert (CAVEAT.split(":")[0] in text.replace("&quot;", '"')) == judged


def test_plots_are_visible_in_headless_chromium(report, tmp_path):
    path, plots = report
    # How the browser decoded and laid out each image, once loaded.
    seen = _probe(
        tmp_path,
        path,
        """window.probe = () => [...document.images].map(i => ({alt: i.alt,
      complete: i.complete, naturalWidth: i.naturalWidth, naturalHeight: i.naturalHeight,
      shownWidth: i.getBoundingClientRect().width, shownHeight: i.getBoundingClientRect().height}));""",
    )
    assert [image["alt"] for image in seen] == plots
    for image in seen:
        assert image["complete"] and image["naturalWidth"] > 300 and image["naturalHeight"] > 200, (
            image
        )
        assert image["shownWidth"] > 300 and image["shownHeight"] > 200, image

    # And the rendered page is not blank: a screenshot of the top holds the measures table and the first plot.
    shot = tmp_path / "shot.png"
    result = _headless(tmp_path, "--window-size=1100,1800", f"--screenshot={shot}", path.as_uri())
    assert shot.exists(), result.stderr[-2000:]
    pixels = Image.open(shot).convert("RGB")
    colours = pixels.getcolors(maxcolors=1 << 20)
    non_white = sum(count for count, rgb in colours if min(rgb) < 240) / (
        pixels.width * pixels.height
    )
    assert (
        len(colours) > 100 and non_white > 0.05
    )  # a near-blank page with one line of text: ~0.0002


# Every table cell's box on the page, in CSS pixels, with the table's caption-like heading and the column
# its first grid column falls in (colspans counted), and the page height for the screenshot.
_CELLS = """window.probe = () => ({
  height: document.documentElement.scrollHeight,
  cells: [...document.querySelectorAll("table")].flatMap((table, t) => [...table.rows].flatMap((row, r) => {
    let column = 0;
    return [...row.cells].map(cell => {
      const box = cell.getBoundingClientRect(), at = column;
      column += cell.colSpan;
      return {table: t, row: r, column: at, header: table.rows[0].cells[Math.min(at, table.rows[0].cells.length - 1)]
        .textContent, x: box.left + window.scrollX, y: box.top + window.scrollY, width: box.width,
        height: box.height};
    });
  })),
});"""


def _ink(picture: Image.Image, box: dict, inset: int = 3) -> int:
    """Pixels in the cell (its borders cut off) that differ clearly from the cell's own background."""
    left, top = max(round(box["x"]) + inset, 0), max(round(box["y"]) + inset, 0)
    # Clipped to the window: beyond it nothing is seen (and PIL would pad the crop with black).
    right = min(round(box["x"] + box["width"]) - inset, picture.width)
    bottom = min(round(box["y"] + box["height"]) - inset, picture.height)
    if right <= left or bottom <= top:
        return 0
    cell = picture.crop((left, top, right, bottom))
    colours = cell.getcolors(maxcolors=1 << 20)
    background = max(colours)[
        1
    ]  # the commonest colour: white, a header's grey or an alert row's pink
    return sum(
        count for count, rgb in colours if max(abs(a - b) for a, b in zip(rgb, background)) > 80
    )


def test_every_table_column_shows_content_on_screen(report, tmp_path):
    """A screenshot at a laptop's window width: every cell of every table, header included, has visible text.

    Fails for an empty column (a cell with no text), and for a column the page renders outside the visible
    part of its table (its pixels are never painted), which a check of the HTML alone would not see.
    """
    path, plots = report
    size = (WINDOW_WIDTH, 1000)
    layout = _probe(
        tmp_path,
        path,
        _CELLS,
        f"--window-size={size[0]},{size[1]}",
        "--force-device-scale-factor=1",
        "--hide-scrollbars",
    )
    assert layout["cells"], "the report has no table"
    # Same window width (the layout depends only on it), tall enough for the whole page.
    height = min(int(layout["height"]) + 50, 16000)
    shot = tmp_path / "page.png"
    result = _headless(
        tmp_path,
        f"--window-size={WINDOW_WIDTH},{height}",
        "--force-device-scale-factor=1",
        "--hide-scrollbars",
        "--virtual-time-budget=10000",
        f"--screenshot={shot}",
        (tmp_path / "probe.html").as_uri(),
    )
    assert shot.exists(), result.stderr[-2000:]
    picture = Image.open(shot).convert("RGB")
    assert picture.size == (WINDOW_WIDTH, height)

    blank: dict[str, list[int]] = {}
    for cell in layout["cells"]:
        if _ink(picture, cell) < 10:  # one character is ~40 dark pixels at this font size
            blank.setdefault(f"table {cell['table'] + 1}, column {cell['header']!r}", []).append(
                cell["row"]
            )
    assert not blank, f"table cells with nothing on screen (rows listed): {blank}"
    # The first table (the judged measures) was really measured: tonight's 4 columns, 9 with a comparison.
    header = [cell["header"] for cell in layout["cells"] if cell["table"] == 0 and cell["row"] == 0]
    assert header == MEASURE_COLUMNS[: len(header)] and len(header) == (
        4 if plots is FIRST_NIGHT_PLOTS else 9
    )
