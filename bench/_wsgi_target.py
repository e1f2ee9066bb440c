"""Import-string target for servers that cannot take an app object (uWSGI).

Builds the benchmark app from ``server_candidates.build_app``; the instance
count and the optional access-log file come from the environment.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from server_candidates import build_app  # noqa: E402

application = build_app(
    n_instances=int(os.environ.get('BENCH_INSTANCES', '10000')),
    access_log=os.environ.get('BENCH_ACCESS_LOG') or None,
)
