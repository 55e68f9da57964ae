"""Shared test configuration: plugin tests run small projects with pytester."""

pytest_plugins = ["pytester"]
