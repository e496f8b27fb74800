"""Errors the trainers report to the user."""


class TrainingError(RuntimeError):
    """A problem the user must fix (bad option, data, checkpoint): trainers report it as one line, exit status 2."""
