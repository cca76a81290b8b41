"""The control plane: ingest, adopt, migrate, status, cutover, rollback, pause, resume, cancel."""

from producer.control import ControlPlane

__all__ = ["ControlPlane"]
