"""``python -m freeshap_ray ...``: the ``freeshap-ray`` command (same arguments, same exit codes) without
needing the console script on PATH, e.g. as a Ray job's entrypoint run with the cluster's Python."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
