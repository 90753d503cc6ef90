"""``python -m tsc_fast.cli``: the same as the ``tsc-fast`` command."""
import sys

from . import main

sys.exit(main())
