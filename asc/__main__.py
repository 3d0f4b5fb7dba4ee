"""``python -m asc`` (also what ``torchrun -m asc train ...`` runs)."""

import sys

from asc.cli import main

sys.exit(main())
