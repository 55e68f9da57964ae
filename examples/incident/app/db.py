"""Engine and session maker, configured from DATABASE_URL at import time, as most apps do."""

import os

from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine


def _async_url(url: str) -> str:
    # Deployment hands us a libpq URL; SQLAlchemy needs the driver named.
    if url.startswith("postgresql://"):
        return "postgresql+asyncpg://" + url[len("postgresql://") :]
    return url


engine = create_async_engine(
    _async_url(os.environ.get("DATABASE_URL", "postgresql://localhost/agents")),
    pool_size=5,
    max_overflow=0,
    pool_timeout=2,
)
AsyncSessionLocal = async_sessionmaker(engine, expire_on_commit=False)
