"""A task package: see :mod:`edgetl.tasks.base` for what a task supplies."""
