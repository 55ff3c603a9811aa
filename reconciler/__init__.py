"""rq-reconciler: keeps an application's Postgres jobs table true to RQ's state in Redis."""

__version__ = "0.1.0"
