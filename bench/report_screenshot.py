"""Look at run reports the way a user does: each ``report.html`` in headless Chromium.

For every run folder given, opens its report (a ``file://`` URL), saves a full-page screenshot to
``bench/screenshots/<name>.png`` and lists what a reader would trip over: console errors, script
errors, images that do not load, and requests that leave the page (the report must be
self-contained). Exits 1 when any page has one, so it can gate a change to ``freeal.report``.

``--fresh`` renders the report again with the current ``freeal.report`` instead of showing the one
the run wrote; ``--no-gold`` (implies ``--fresh``) renders it as if the texts had no gold labels.
Both work on a copy of the run's step files in a temporary folder: run folders are only read.

    python bench/report_screenshot.py RUN_DIR [RUN_DIR ...] [--fresh] [--no-gold]

Chromium is the Debian package (``apt-get install chromium``), driven by ``pip install
playwright`` without ``playwright install`` (no browser download needed).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from playwright.sync_api import Page

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
OUT = Path(__file__).resolve().parent / "screenshots"
# what a run records only because its texts had gold labels (see freeal.loop): dropped by --no-gold
GOLD_KEYS = {
    "metrics", "transductive", "inductive", "clean_precision", "noisy_precision",
    "clean_set_precision", "fixed", "broken", "asked_accuracy_before", "calibration",
}  # fmt: skip


@dataclass
class Seen:
    """What one page showed: its screenshot and the problems a reader would meet."""

    name: str
    png: Path
    problems: list[str] = field(default_factory=list)


def fresh_report(run_dir: Path, scratch: Path, no_gold: bool) -> Path:
    """The run's report rendered again by the current code from a copy of its JSON(L) files
    (model weights are not needed), gold-derived numbers dropped with ``no_gold``."""
    from freeal.report import collect, write_html

    copy = scratch / run_dir.name
    for src in run_dir.rglob("*"):
        if src.suffix not in (".json", ".jsonl") or src.name.startswith("report"):
            continue
        dst = copy / src.relative_to(run_dir)
        dst.parent.mkdir(parents=True, exist_ok=True)
        if no_gold and src.name == "step.json":
            step = {k: v for k, v in json.loads(src.read_text()).items() if k not in GOLD_KEYS}
            dst.write_text(json.dumps(step))
        else:
            shutil.copyfile(src, dst)
    return write_html(collect(copy), copy / "report.html")


def look(page: Page, html: Path, name: str, out: Path) -> Seen:
    """Open ``html`` in ``page``, screenshot it whole, and note console errors, script errors,
    requests leaving the page and images that did not load."""
    seen = Seen(name, out / f"{name}.png")
    page.on("console", lambda m: m.type == "error" and seen.problems.append(f"console: {m.text}"))
    page.on("pageerror", lambda e: seen.problems.append(f"script error: {e}"))
    page.on(
        "request",
        lambda r: (
            r.url.split(":", 1)[0] not in ("file", "data")
            and seen.problems.append(f"request off the page: {r.url}")
        ),
    )
    page.goto(html.resolve().as_uri(), wait_until="load")
    broken = page.evaluate(
        "[...document.images].filter(i => !i.complete || !i.naturalWidth)"
        ".map(i => i.alt || i.src.slice(0, 60))"
    )
    seen.problems += [f"broken image: {b}" for b in broken]
    if not page.evaluate("document.images.length"):
        seen.problems.append("no plots at all")
    page.screenshot(path=str(seen.png), full_page=True)
    return seen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--fresh", action="store_true", help="render with the current freeal.report")
    parser.add_argument("--no-gold", action="store_true", help="render as if there were no gold labels")
    parser.add_argument("--out", type=Path, default=OUT, help="where the PNGs go")
    parser.add_argument("--width", type=int, default=1280, help="viewport width in pixels")
    args = parser.parse_args(argv)
    from playwright.sync_api import sync_playwright

    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "-nogold" if args.no_gold else "-fresh" if args.fresh else ""
    results = []
    with tempfile.TemporaryDirectory() as scratch, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        for run_dir in args.run_dirs:
            html = (
                fresh_report(run_dir, Path(scratch), args.no_gold)
                if args.fresh or args.no_gold
                else run_dir / "report.html"
            )
            page = browser.new_page(viewport={"width": args.width, "height": 900})
            results.append(look(page, html, run_dir.name + suffix, args.out))
            page.close()
        browser.close()
    for seen in results:
        print(f"{seen.png}: {'; '.join(seen.problems) or 'ok'}")
    return 1 if any(seen.problems for seen in results) else 0


if __name__ == "__main__":
    sys.exit(main())
