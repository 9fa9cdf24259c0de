"""Alembic environment: the engine comes from fracwatch (the app passes its own; the CLI reads the settings)."""

from __future__ import annotations

from sqlalchemy import Engine

from alembic import context
from fracwatch.store.models import Base

config = context.config
target_metadata = Base.metadata


def _engine() -> Engine:
    engine = config.attributes.get("engine")
    if engine is not None:
        return engine  # type: ignore[no-any-return]
    # `alembic` run by hand from a checkout: use the same settings as the app.
    from fracwatch.config import load_settings
    from fracwatch.store.db import make_engine

    return make_engine(load_settings().database_url)


def run_migrations_offline() -> None:
    from fracwatch.config import load_settings

    context.configure(url=load_settings().database_url, target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    with _engine().connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=connection.dialect.name == "sqlite",
        )
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
