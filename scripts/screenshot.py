"""Retake the README's screenshot: the demo model page with the preview of a background prune.

    .venv/bin/python scripts/screenshot.py [--workspace data/demo] [--out docs/img/screenshot.png]

Builds the demo if needed, serves it on 127.0.0.1 with a throw-away database, signs in with
a one-time link and, in Debian's Chromium, picks the class whose training background is
"water", prunes "water background" for it and captures the page once the preview shows.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workspace", type=Path, default=ROOT / "data" / "demo")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "screenshot.png")
    parser.add_argument("--concept", default="water background")
    args = parser.parse_args()

    from ml.demo.build import build_demo
    from ml.demo.world import default_config
    from tests.e2e.harness import Server, chromium, login_link, migrated, new_page, require_browser

    sync_api = require_browser()
    build_demo(args.workspace.resolve())
    background = args.concept.split()[0]
    class_name = next(c for c, b in (default_config().pairing or {}).items() if b == background)
    with tempfile.TemporaryDirectory(prefix="pcbm-shot-") as tmp:
        root = Path(tmp) / "demo"
        shutil.copytree(args.workspace, root, ignore=shutil.ignore_patterns("pcbm.db*", "artifacts", "secret_key"))
        server = Server(migrated(root))
        server.start()
        try:
            errors: list[str] = []
            with chromium(sync_api) as browser:
                page = new_page(browser, server.url, errors, 30_000)
                page.set_viewport_size({"width": 1360, "height": 1000})
                page.goto(login_link(root, "researcher"))
                page.goto("/models/pcbm")
                page.select_option("#f-class", class_name)
                page.locator(f'tr[data-concept="{args.concept}"] button[name="prune_class"]').click()
                sync_api.expect(page.locator("#preview-splits")).to_be_visible()
                page.evaluate("window.scrollTo(0, 0)")  # the page head, the class chart and the preview
                args.out.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(args.out), full_page=False)
            if errors:
                print(f"JavaScript errors: {errors}", file=sys.stderr)
                return 1
        finally:
            server.stop()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
