"""`cli.py demo`: a generated action benchmark (synthetic) and the whole pipeline run on it."""
