"""Alembic environment: the URL comes from :func:`secateurs.app.migrate.alembic_config`, the metadata from
``secateurs.app.db``."""

from __future__ import annotations

from alembic import context

from secateurs.app.db import Base, make_engine

config = context.config


def run() -> None:
    url = config.get_main_option("sqlalchemy.url")
    assert url, "alembic_config() sets sqlalchemy.url"
    if context.is_offline_mode():
        context.configure(url=url, target_metadata=Base.metadata, literal_binds=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = make_engine(url)
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


run()
