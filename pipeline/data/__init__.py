"""The feature cache format and the datasets read from it."""
