"""`cli.py eval`, `embed` and `export`: labelled tasks, features of each row (checkpoint, scratch,
inflate, teacher), the protocols (linear, kNN, retrieval, fine-tune, zero-shot) and their reports."""
