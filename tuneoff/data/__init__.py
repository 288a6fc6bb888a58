"""Task data: the built-in tasks and your own (tasks/), tokenized and packed into fixed-length rows."""
