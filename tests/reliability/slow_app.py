"""``create_app`` for the shutdown and overload checks: the real app, with delays injected.

``uvicorn --factory tests.reliability.slow_app:create_app``. Settings come from the
``PCBM_*`` environment as for the real app; two more variables slow it down where a test
needs a request to be in flight for a while:

- ``PCBM_TEST_EDIT_DELAY_S``: the head editor sleeps this long before each edit, so a
  preview (inside its concurrency slot) or a commit takes at least that long;
- ``PCBM_TEST_LOAD_DELAY_S``: the model loader waits this long before importing and
  loading the workspace, so ``/readyz`` stays 503 for that long after startup.

Nothing else differs from ``app.main:create_app``.
"""

from __future__ import annotations

import os
import time

from app.main import create_app as real_create_app
from app.services.workspace_import import import_and_load


def create_app():
    edit_delay = float(os.environ.get("PCBM_TEST_EDIT_DELAY_S", "0"))
    load_delay = float(os.environ.get("PCBM_TEST_LOAD_DELAY_S", "0"))

    def slow_loader(ctx) -> None:
        time.sleep(load_delay)
        import_and_load(ctx)

    app = real_create_app(model_loader=slow_loader if load_delay > 0 else None)
    if edit_delay > 0:
        ctx = app.state.ctx
        editor = ctx.head_editor

        def slow_editor(model, state, edits):
            time.sleep(edit_delay)
            return editor(model, state, edits)

        ctx.head_editor = slow_editor
    return app
