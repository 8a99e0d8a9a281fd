"""Reliability and security checks of issue 8: the service keeps data safe under faults,
load and hostile input. See ``docs/reliability.md`` for what each module proves.

Tests that start a real server (uvicorn in a subprocess, on a loopback port) are marked
``slow``; their longer modes are ``make fuzz-long``, ``make crash-loop`` and ``make load``.
"""
