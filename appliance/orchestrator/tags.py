"""Tags a migration leaves on what it touches, so its leftovers are found without Redis.

On the source VM (set in prepare, before anything changes it; removed last when the
migration completes or rolls back)::

    ferry.migration     the migration id
    ferry.prior_power   the VM's power state before the migration
    ferry.prior_pool    its resource pool before the migration
    ferry.stage         "cutover" once the cut-over is reached: from then on the cloud
                        copy is the finished one, never to be undone
    ferry.request       request id, correlation id, group id and migration type: enough
                        to tell the requester the migration failed when Redis lost it

On every cloud volume it creates: ``ferry.migration`` and ``ferry.source_vm``. The
cloud VM's id is the migration id, and the snapshot is ``ferry-<migration id>``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from appliance.sites.model import VmConfig

MIGRATION = "ferry.migration"
PRIOR_POWER = "ferry.prior_power"
PRIOR_POOL = "ferry.prior_pool"
STAGE = "ferry.stage"
SOURCE_VM = "ferry.source_vm"
REQUEST = "ferry.request"
CUTOVER = "cutover"

SOURCE_TAGS = (MIGRATION, PRIOR_POWER, PRIOR_POOL, STAGE, REQUEST)


@dataclass(frozen=True, slots=True)
class RequestTag:
    """Who asked for a migration, kept on its source VM."""

    request_id: str
    correlation_id: str
    group_id: str
    migration_type: str

    def value(self) -> str:
        return json.dumps(
            [self.request_id, self.correlation_id, self.group_id, self.migration_type]
        )

    @classmethod
    def of(cls, vm: VmConfig) -> RequestTag | None:
        try:
            parts = json.loads(vm.tag(REQUEST) or "null")
            return cls(*(str(part) for part in parts)) if len(parts) == 4 else None
        except (ValueError, TypeError):
            return None


def snapshot_name(migration_id: str, attempt: int = 0) -> str:
    """One per attempt: a resumed migration takes a new snapshot (see ``resume``)."""
    base = f"ferry-{migration_id}"
    return f"{base}-r{attempt}" if attempt else base


def is_snapshot_of(name: str, migration_id: str) -> bool:
    """Whether a snapshot was taken by any attempt of ``migration_id``."""
    base = snapshot_name(migration_id)
    return name == base or (name.startswith(f"{base}-r") and name[len(base) + 2 :].isdigit())


def pending_migration(vm: VmConfig) -> str | None:
    """The migration a source VM is tagged with (one not finished or undone), if any."""
    return vm.tag(MIGRATION)


def cleared() -> dict[str, str | None]:
    """What removes every source tag."""
    return dict.fromkeys(SOURCE_TAGS)
