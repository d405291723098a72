"""Model + layers → a new live process."""
