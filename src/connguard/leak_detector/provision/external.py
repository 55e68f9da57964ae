"""The url backend: an existing server given by URL (what a CI service container hands over).

connguard only creates and drops its own databases there; it never touches other databases.
"""

from __future__ import annotations

from . import ProvisionError, Server, janitor, normalize_scheme


class ExternalProvider:
    name = "url"

    def __init__(self, url: str | None) -> None:
        self.url = normalize_scheme(url) if url else None
        self._facts: tuple[str, int] | None = None

    def unavailable_reason(self) -> str | None:
        if not self.url:
            return "no URL given (--leak-check-db-url or CONNGUARD_DATABASE_URL)"
        try:
            self._facts = janitor.server_facts(self.url)
        except ProvisionError as error:
            return str(error)
        return None

    def start(self) -> Server:
        if self._facts is None:
            reason = self.unavailable_reason()
            if reason:
                raise ProvisionError(reason)
        version, max_connections = self._facts
        return Server(
            backend=self.name, url=self.url, version=version, max_connections=max_connections
        )

    def stop(self) -> None:
        """The server is not ours; the plugin drops the databases it created."""
