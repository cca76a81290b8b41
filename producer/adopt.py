"""`reembed adopt`: an existing collection put under an alias, once its vectors are checked.

A collection made outside reembed says which model it was embedded with only in what Chroma
persisted (its embedding function's configuration), if at all. Before the alias serves it,
a worker re-embeds a few of its documents with the claimed model and compares them with the
stored vectors (``reembed.check_vectors``): a wrong claim would mix two vector spaces.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import celery.exceptions
import structlog

from reembed.api_models import declared_for_openai, declared_models
from reembed.errors import AliasExistsError, InputError, ModelMismatchError, QueueUnavailableError
from reembed.messages import CheckVectorsRequest, VectorCheck
from reembed.migrations import check_alias_name
from reembed.models import fingerprint, resolve_configured
from reembed.progress import alias_lock
from reembed.registry import REGISTRY_COLLECTION, CollectionRecord, Registry

if TYPE_CHECKING:
    from producer.control import ControlPlane

log = structlog.get_logger(__name__)


def adopt(plane: ControlPlane, alias: str, collection: str, model: str | None = None,
          timeout: float = 600) -> dict[str, Any]:
    """Put an existing collection under ALIAS after checking that its vectors are the claimed model's.

    Raises:
        AliasExistsError, CollectionNotFoundError, InputError (no model known),
        ModelNotFoundError, ModelMismatchError.
    """
    check_alias_name(alias)
    if plane.registry.has_alias(alias):
        raise AliasExistsError(f"alias {alias!r} already exists")
    refuse_owned(plane.registry, collection)
    if plane.store.count(collection) == 0:
        raise InputError(f"collection {collection!r} is empty; there is nothing to verify a model against")
    ef = plane.store.configuration(collection).get("embedding_function") or {}
    declared = (ef.get("config") or {}).get("model_name") if ef.get("name") == "sentence_transformer" else None
    if ef.get("name") == "openai" and not model:
        declared = declared_for_openai(declared_models(plane.settings.models_file), ef.get("config") or {},
                                       collection, plane.settings.models_file)
    claimed = model or declared
    if not claimed:
        raise InputError(
            f"collection {collection!r} records no sentence-transformers model; name it with --model"
        )
    spec = resolve_configured(plane.settings, claimed)
    fp = fingerprint(spec, plane.settings.data_dir)
    if not plane.outbox.workers(plane.settings.worker_wait_s):
        raise QueueUnavailableError(f"no reembed worker is running to check the vectors of {collection!r}; "
                                    "start one with `reembed worker` and run adopt again")
    check = plane.outbox.check_vectors(CheckVectorsRequest(collection=collection, model=spec.name))
    try:
        result = VectorCheck.model_validate(check.get(timeout=timeout))
    except (celery.exceptions.TimeoutError, TimeoutError):
        check.revoke()
        raise QueueUnavailableError(f"no worker answered the model check of {collection!r} within {timeout:.0f} s; "
                                    "start one with `reembed worker` (it reads the reembed.control queue)") from None
    if not result.match:
        raise ModelMismatchError(
            f"collection {collection!r} was not embedded with {spec.name!r}: stored vectors are "
            f"{result.dimension_stored}-d, the model's {result.dimension_model}-d, cosine of re-embedded "
            f"documents {result.cosine_min}; name the right model with --model"
        )
    plane.registry.put_collection(CollectionRecord(
        name=collection, model=spec.name, fingerprint=fp, dimension=result.dimension_model,
        origin="adopt", probe=result.probe,
    ))
    with alias_lock(plane.redis, alias):
        if plane.registry.has_alias(alias):
            raise AliasExistsError(f"alias {alias!r} already exists")
        refuse_owned(plane.registry, collection)  # again under the lock: another adopt may have won meanwhile
        plane.registry.switch_alias(alias, collection, None)
    log.info("collection adopted", alias=alias, collection=collection, model=spec.name)
    return {"alias": alias, "collection": collection, "model": spec.name, "fingerprint": fp,
            "declared_model": declared, "checked": result.checked, "cosine_min": result.cosine_min}

def refuse_owned(registry: Registry, collection: str) -> None:
    """One collection serves one alias: retiring one alias would otherwise delete the other's."""
    if collection == REGISTRY_COLLECTION:
        raise InputError(f"collection {collection!r} is reembed's own registry; it holds no documents to serve")
    owner = registry.owners().get(collection)
    if owner is not None:
        raise InputError(f"collection {collection!r} belongs to alias {owner!r}; one collection serves one alias: "
                         f"search {owner!r} instead, or copy the collection and adopt the copy")

