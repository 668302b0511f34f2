"""Plumbing every stage uses: settings (config), errors, run folders, file locks, progress, TensorBoard."""
