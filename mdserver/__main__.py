"""`python3 -m mdserver CONFIG` runs the daemon."""

import sys

from mdserver.cli import daemon_main

sys.exit(daemon_main(sys.argv[1:]))
