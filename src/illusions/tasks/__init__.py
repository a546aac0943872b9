"""Tasks: token data, named splits and the positions to score. See :mod:`illusions.tasks.base`."""

from illusions.tasks.base import Scored, Split, Task, Vocab

__all__ = ["Scored", "Split", "Task", "Vocab"]
