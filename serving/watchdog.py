"""``python -m serving.watchdog PARENT_PID PORT``: stops the HAProxy a serving run started once the run is gone.

Started by ``pneumonia serve`` and ``pneumonia run`` in a session of its own, so a SIGKILL of the run's
process group does not take it along (see ``serving.http_proxy``).
"""

import sys

from serving.http_proxy import ignore_hangups, watch

if __name__ == "__main__":
    ignore_hangups()
    watch(int(sys.argv[1]), int(sys.argv[2]))
