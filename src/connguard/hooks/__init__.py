"""pre-commit entry points: the check hook and the fix hook."""
