"""Research studies run on top of the course tasks, one module each."""
