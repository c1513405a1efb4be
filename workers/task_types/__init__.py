"""Built-in task types; each module exports ``TASK_TYPE`` (registered by entry point)."""
