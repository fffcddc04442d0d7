"""The clocks the request path reads, as compiled constants.

A name imported with `from time import monotonic` is a module global: compiled code looks it up in
the module's dictionary at every call. A Final name here is a C static instead, read directly by
every compiled module that imports it. Both are CLOCK_MONOTONIC on Linux; `perf_counter` is kept
for durations (latency, access-log times) and `monotonic` for deadlines and idle times, as the
standard library names them.
"""

from __future__ import annotations

import time
from typing import Final

monotonic: Final = time.monotonic
perf_counter: Final = time.perf_counter
