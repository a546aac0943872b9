"""Tasks: token data, named splits and the positions to score. See :mod:`illusions.tasks.base`."""

from illusions.tasks.base import PositionGroup, Scored, Split, Task, Vocab

__all__ = ["PositionGroup", "Scored", "Split", "Task", "Vocab"]
