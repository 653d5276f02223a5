"""`python -m tui_trainer` is the same as `tui-trainer`."""

import sys

from tui_trainer.cli import main

sys.exit(main())
