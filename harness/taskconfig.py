"""What a task's configuration may say, shared by the task spec and the session without
importing torch or transformers: the error a bad task field raises and the truncation modes."""

TRUNCATIONS = ("left", "middle")


class TaskConfigError(ValueError):
    """A task's configuration is invalid; the message names the field and the fix."""
