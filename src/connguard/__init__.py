"""connguard: catch database connection leaks in async Python, statically and per test."""

__version__ = "0.1.0"
