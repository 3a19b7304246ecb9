"""``python -m pfs_sglang.launch_server``: start a whole PrefillShare deployment.

A thin entry point; the command line is ``pfs_sglang.launch.cli``, the deployment
``pfs_sglang.launch.deployment``. ``--help`` lists the flags.
"""

import sys

from pfs_sglang.launch.cli import main

if __name__ == "__main__":
    sys.exit(main())
