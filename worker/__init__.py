"""Celery workers: thin tasks over plain functions (``worker.embedding``)."""
