"""The shared formatters (tui_trainer/fmt.py), under the name the app's modules import."""

from tui_trainer.fmt import *  # noqa: F403
from tui_trainer.fmt import __all__ as __all__
