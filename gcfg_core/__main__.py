"""``python -m gcfg_core``: see `gcfg_core.cli`."""

import sys

from gcfg_core.cli import main

sys.exit(main())
