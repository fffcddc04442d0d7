"""The clock the request path reads, as a compiled constant.

A name imported with `from time import monotonic` is a module global: compiled code looks it up in
the module's dictionary at every call. A Final name here is a C static instead, read directly by
every compiled module that imports it. One clock serves deadlines, idle times and durations
(latency, access-log times): CLOCK_MONOTONIC, to the nanosecond on Linux (what `perf_counter` reads
there too), so one reading can start a request's deadline and time its answer.
"""

from __future__ import annotations

import time
from typing import Final

monotonic: Final = time.monotonic
