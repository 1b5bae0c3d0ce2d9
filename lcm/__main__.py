"""`python -m lcm`: see lcm.cli."""

import sys

from lcm.cli import main

sys.exit(main())
