"""Alembic migrations of the job store (``service.store``); run by :class:`service.store.Store`."""
