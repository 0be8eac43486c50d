#!/usr/bin/env python
"""Render a run's report.html in headless Chromium and check that every image on it loaded.

    python scripts/check_report_chromium.py RUN_DIR [--screenshot FILE.png]

Builds the report first when RUN_DIR has no report.html. A copy of the page gets a small script
that, once the page has loaded, counts the images that decoded (``naturalWidth > 0``) and writes
the result into the DOM; Chromium's ``--dump-dom`` prints it. Network access is not needed (the
report embeds its images), so background networking is switched off.

Needs Chromium: on Debian/Ubuntu ``apt-get update && apt-get install -y chromium``; or set
``$CHROMIUM`` to the browser binary. Exit code 0 = passed, 1 = an image failed, 2 = could not check.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
MARKER_ID = "clmae-image-check"
CHECKER = f"""
<script>
window.addEventListener("load", function () {{
  var imgs = Array.prototype.slice.call(document.images);
  var result = {{total: imgs.length, loaded: 0, broken: [], sizes: []}};
  imgs.forEach(function (img) {{
    if (img.complete && img.naturalWidth > 0 && img.naturalHeight > 0) {{
      result.loaded += 1;
      result.sizes.push([img.alt, img.naturalWidth, img.naturalHeight]);
    }} else {{
      result.broken.push(img.alt || img.src.slice(0, 60));
    }}
  }});
  var out = document.createElement("pre");
  out.id = "{MARKER_ID}";
  out.textContent = JSON.stringify(result);
  document.body.appendChild(out);
}});
</script>
"""


def find_browser() -> str | None:
    if os.environ.get("CHROMIUM"):
        return os.environ["CHROMIUM"]
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


def browser_flags(profile: str) -> list[str]:
    return ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
            "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--virtual-time-budget=10000"]


def check(report: Path, browser: str, screenshot: Path | None = None, timeout: float = 180) -> dict:
    """Load ``report`` in headless Chromium; return the checker's result plus the page's <img> count."""
    page = report.read_text(encoding="utf-8")
    expected = len(re.findall(r"<img\b", page))
    external = re.findall(r"<img\b[^>]*\bsrc=['\"](?!data:)([^'\"]+)", page)
    with tempfile.TemporaryDirectory(prefix="clmae-chromium-") as tmp:
        probe_page = Path(tmp) / "report-check.html"
        probe_page.write_text(page.replace("</body>", CHECKER + "</body>"), encoding="utf-8")
        profile = str(Path(tmp) / "profile")
        cmd = [browser, *browser_flags(profile), "--dump-dom", probe_page.as_uri()]
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout)
        match = re.search(rf'<pre id="{MARKER_ID}">(.*?)</pre>', proc.stdout, re.DOTALL)
        if not match:
            raise RuntimeError(f"Chromium printed no result (exit {proc.returncode}): {proc.stderr.strip()[-500:]}")
        result = json.loads(match.group(1).replace("&quot;", '"').replace("&amp;", "&"))
        if screenshot is not None:
            shot_cmd = [browser, *browser_flags(profile + "-shot"), "--hide-scrollbars", "--window-size=1200,3000",
                        f"--screenshot={screenshot.resolve()}", report.resolve().as_uri()]
            subprocess.run(shot_cmd, check=False, capture_output=True, text=True, timeout=timeout)
    result["expected"] = expected
    result["external"] = external
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run folder (report.html is built if missing)")
    parser.add_argument("--report", help="the HTML file to check (default RUN_DIR/report.html)")
    parser.add_argument("--screenshot", help="also save a screenshot of the rendered page here")
    args = parser.parse_args(argv)

    run_dir = Path(args.run_dir)
    report = Path(args.report) if args.report else run_dir / "report.html"
    if not report.is_file():
        from clmae.viz.report import build_report

        report = build_report(run_dir, report)
        print(f"built {report}")
    browser = find_browser()
    if browser is None:
        print("FAIL: no Chromium found; install it (apt-get update && apt-get install -y chromium) or set $CHROMIUM",
              file=sys.stderr)
        return 2
    try:
        result = check(report, browser, Path(args.screenshot) if args.screenshot else None)
    except (RuntimeError, subprocess.TimeoutExpired, OSError) as exc:
        print(f"FAIL: could not render {report}: {exc}", file=sys.stderr)
        return 2
    sizes = ", ".join(f"{alt} {w}x{h}" for alt, w, h in result["sizes"])
    ok = (result["total"] == result["expected"] > 0 and result["loaded"] == result["total"] and not result["broken"]
          and not result["external"])
    status = "PASS" if ok else "FAIL"
    print(f"{status}: {result['loaded']} of {result['total']} images loaded in headless Chromium "
          f"({result['expected']} <img> tags in {report.name}; {len(result['external'])} not embedded)")
    if sizes:
        print(f"  {sizes}")
    if result["broken"]:
        print(f"  broken: {result['broken']}")
    if args.screenshot:
        print(f"  screenshot: {args.screenshot}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
