"""The control plane (ingest, adopt, migrate, status, cutover, rollback, canary, retire, ...)
and the write path (add, upsert, delete through an alias)."""

from producer.control import ControlPlane
from producer.writes import Writer

__all__ = ["ControlPlane", "Writer"]
