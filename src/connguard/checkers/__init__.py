"""The static layer: LibCST ownership analysis, rules, fixes, CLI and flake8 adapter."""
