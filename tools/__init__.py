"""Developer tools that are not part of the served package (they are not in the wheel)."""
