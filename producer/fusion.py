"""`reembed fusion`: which fusion ``hybrid`` serves for each model of an alias.

A fusion belongs to a model on an alias (how good that model's ranking is next to BM25 on those
documents), not to a collection: it survives cutovers and rollbacks, and a canary's queries are
fused with the canary model's own setting.
"""

from __future__ import annotations

from typing import Any

import redis
import structlog

from reembed.errors import InputError, ReembedError
from reembed.fusion import FusionSpec
from reembed.models import resolve_configured
from reembed.progress import alias_lock
from reembed.registry import AliasRecord, MigrationState, Registry
from reembed.settings import Settings

log = structlog.get_logger(__name__)


def alias_models(registry: Registry, alias: AliasRecord) -> list[str]:
    """The models of every collection the alias serves or may serve: live, previous, canary,
    and the targets of its migrations that are complete or live."""
    names = [alias.live_collection, alias.previous_collection, alias.canary.collection if alias.canary else None]
    names += [m.target_collection for m in registry.migrations(alias.alias)
              if m.kind == "migrate" and m.state in (MigrationState.COMPLETE, MigrationState.RUNNING,
                                                     MigrationState.VERIFYING, MigrationState.LIVE)]
    models: list[str] = []
    for name in names:
        if name and registry.store.exists(name):
            model = registry.get_collection(name).model
            if model not in models:
                models.append(model)
    return models


def set_fusion(registry: Registry, client: redis.Redis, settings: Settings, alias: str, model: str | None,
               fusion: FusionSpec | None) -> AliasRecord:
    """Carry ``fusion`` for ``model`` (default: the live collection's) on ``alias``; ``None`` forgets it.

    A model the alias has no collection of yet is accepted when it is a known model (evaluate
    before migrating), under its canonical name, as collection records name it.

    Raises:
        InputError: ``model`` is neither a model of the alias nor a known model.
    """
    with alias_lock(client, alias):
        current = registry.get_alias(alias)
        models = alias_models(registry, current)
        chosen = model or models[0]
        if chosen not in models:
            try:
                chosen = resolve_configured(settings, chosen).name
            except ReembedError as exc:
                raise InputError(f"alias {alias!r} has no collection made with model {chosen!r} (its models: "
                                 f"{', '.join(models)}), and {exc}") from exc
        record = registry.set_fusion(alias, chosen, fusion, current.generation)
    log.info("fusion set", alias=alias, model=chosen, fusion=fusion.describe() if fusion else "default")
    return record


def fusion_table(registry: Registry, alias: AliasRecord, settings: Settings) -> list[dict[str, Any]]:
    """Per model of the alias: the fusion ``hybrid`` uses and where it came from."""
    rows = []
    for model in dict.fromkeys([*alias_models(registry, alias), *alias.fusion]):
        spec = alias.fusion.get(model)
        effective = spec or settings.fusion
        rows.append({"model": model, "fusion": effective.describe(), "tuned_on": effective.tuned_on,
                     "carried_by_alias": spec is not None})
    return rows
