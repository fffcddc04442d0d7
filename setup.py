"""Compiles lbd's per-request path with mypyc; everything else about the package is in pyproject.toml.

mypyc turns these type-annotated modules into C extensions (the way black and mypy ship), which
roughly halves the Python time lbd spends per proxied request. The sources stay plain Python: set
LB_PURE_PYTHON=1, or build without a C compiler, and the same modules run interpreted (slower,
otherwise identical).
"""

from __future__ import annotations

import os
import shutil
import sys

from setuptools import setup

# The modules every proxied request runs through (see the README's Performance section).
COMPILED = [
    "lbd/clock.py",
    "lbd/proxy/flow.py",
    "lbd/proxy/byte_runs.py",
    "lbd/proxy/headers.py",
    "lbd/proxy/request.py",
    "lbd/proxy/request_scan.py",
    "lbd/proxy/response.py",
    "lbd/proxy/framing.py",
    "lbd/proxy/retry.py",
    "lbd/proxy/attempt.py",
    "lbd/proxy/splice.py",
    "lbd/proxy/deadlines.py",
    "lbd/proxy/pool.py",
    "lbd/proxy/upstream.py",
    "lbd/proxy/exchange.py",
    "lbd/proxy/client.py",
    "lbd/proxy/context.py",
    "lbd/accesslog.py",
    "lbd/accesslog_writer.py",
    "lbd/models.py",
    "lbd/registry.py",
    "lbd/balancer.py",
    "lbd/sessions.py",
    "lbd/store/session_sync.py",
    "lbd/routing/static.py",
    "lbd/routing/dynamic.py",
    "lbd/routing/regions.py",
]


def _compiled_extensions() -> list[object]:
    if os.environ.get("LB_PURE_PYTHON") == "1":
        return []
    if shutil.which(os.environ.get("CC", "cc")) is None:
        print("lb: no C compiler found; installing lbd as pure Python (slower)", file=sys.stderr)
        return []
    from mypyc.build import mypycify

    # One group, one shared library (lbd/compiled__mypyc): calls and attribute reads between these
    # modules are direct C calls and struct reads, not Python lookups.
    return list(mypycify(COMPILED, opt_level="3", group_name="lbd.compiled"))


setup(ext_modules=_compiled_extensions())
