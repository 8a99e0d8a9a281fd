"""Schemathesis hooks for the fuzz run (loaded through the ``hooks`` key of its config).

The fuzzer calls every operation with the fuzzing admin's token, so a generated
``PATCH /api/v1/users/{id}`` with that admin's id (deactivate, demote) or a
``DELETE /api/v1/tokens/{id}`` with its token's id would lock the rest of the run out,
and every later case would only see 401. Those ids (``FUZZ_PROTECTED_IDS``, JSON
``{"user_id": [..], "token_id": [..]}``) are swapped for an id that does not exist;
every other value goes through as generated.
"""

from __future__ import annotations

import json
import os

import schemathesis

UNKNOWN_ID = 2_000_000_000
_PROTECTED = {name: {str(v) for v in values}
              for name, values in json.loads(os.environ.get("FUZZ_PROTECTED_IDS", "{}")).items()}


@schemathesis.hook
def before_call(context, case, kwargs):  # noqa: ARG001 - the hook's signature
    params = case.path_parameters
    if not params:
        return
    for name, protected in _PROTECTED.items():
        if name in params and str(params[name]) in protected:
            params[name] = UNKNOWN_ID
