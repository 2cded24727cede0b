"""How a migration looks to clients, and telling them: SourceCloneResponse from a record."""

from __future__ import annotations

from datetime import datetime

from appliance.clock import Clock
from appliance.errors import BusUnavailable
from appliance.logs import get_logger
from appliance.orchestrator.figures import CacheFigureReader, CacheFigures
from appliance.orchestrator.reconcile_figures import round_of
from appliance.orchestrator.record import CUTOVER_SECONDS, PAUSED_REASON, MigrationRecord
from appliance.orchestrator.states import Step, phase_of, public_state
from appliance.sink import EventSink
from messages.common import ErrorInfo, MigrationState
from messages.events import MigrationStatus, RecoveryInfo, SourceCloneResponse

log = get_logger(__name__)


COPYING = frozenset(
    {Step.TRANSFERRING, Step.BULK_COPYING, Step.AWAITING_BULK, Step.RECONCILING, Step.CUTTING_OVER}
)
"""Steps that move data: their rate and ETA are shown."""
NOTHING_TO_COPY_IS_DONE = frozenset(
    {Step.RECONCILING, Step.CUTTING_OVER, Step.CUT_OVER, Step.COMMITTING}
)
"""Steps where figures of 0 bytes mean a pass found nothing to copy (done), not "not yet
planned"."""


def percent(record: MigrationRecord) -> float:
    if record.step is Step.COMPLETED:
        return 100.0
    if record.bytes_total <= 0:
        return 100.0 if record.step in NOTHING_TO_COPY_IS_DONE else 0.0
    return round(min(100.0, 100.0 * record.bytes_done / record.bytes_total), 2)


def status_of(
    record: MigrationRecord,
    cancel_requested: bool,
    queue_position: int | None = None,
    figures: CacheFigures | None = None,
) -> MigrationStatus:
    """How a record looks to clients; ``figures``: its cache's, for a warm or tbc VM."""
    cache = figures or CacheFigures()
    error = None
    if record.error_code is not None:
        error = ErrorInfo(code=record.error_code, message=(record.error_message or "")[:4096])
    state = public_state(record.step, cancel_requested)
    paused = record.extra.get(PAUSED_REASON)
    if not isinstance(paused, str) or state is not MigrationState.RUNNING:
        paused = None
    return MigrationStatus(
        migration_id=record.migration_id,
        request_id=record.request_id,
        vm_id=record.vm_id,
        vm_name=record.vm_name,
        migration_type=record.migration_type,
        state=MigrationState.PAUSED if paused else state,
        phase=phase_of(record.step),
        group_id=record.group_id,
        queue_position=queue_position if record.step is Step.QUEUED else None,
        progress_percent=percent(record),
        bytes_done=record.bytes_done,
        bytes_total=record.bytes_total,
        rate_bytes_per_s=record.rate_bytes_per_s if record.step in COPYING else 0.0,
        eta_seconds=record.eta_seconds if record.step in COPYING else None,
        bandwidth_cap_bps=record.bandwidth_cap_bps if record.step is Step.TRANSFERRING else None,
        checks=tuple(check.wire() for check in record.checks),
        error=error,
        pause_reason=paused[:1024] if paused else None,
        updated_at=datetime.fromisoformat(record.updated_at),
        committed_epoch=cache.committed_epoch,
        last_epoch_at=cache.last_epoch_at,
        rpo_lag_s=cache.rpo_lag_s,
        dirty_bytes=cache.dirty_bytes,
        cache_bytes=cache.cache_bytes,
        cutover_s=_seconds(record.extra.get(CUTOVER_SECONDS)),
        volumes=tuple(disk.volume_id for disk in record.disks),
        reconcile_pass=round_of(record),
        recovery=_recovery(record),
    )


def _recovery(record: MigrationRecord) -> RecoveryInfo | None:
    if record.recovery_component is None:
        return None
    return RecoveryInfo(
        component=record.recovery_component,
        reason=(record.recovery_reason or "")[:4096],
        pool=record.recovery_pool,
        verdict=record.recovery_verdict[:4096],
    )


def _seconds(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


class Reporter:
    """Publishes SourceCloneResponses; a bus outage never stops a migration."""

    def __init__(
        self,
        appliance_id: str,
        sink: EventSink,
        clock: Clock,
        figures: CacheFigureReader | None = None,
    ) -> None:
        self._appliance_id = appliance_id
        self._sink = sink
        self._clock = clock
        self._figures = figures

    async def status(
        self, record: MigrationRecord, cancel_requested: bool, queue_position: int | None = None
    ) -> MigrationStatus:
        """:func:`status_of`, with the figures of the cache serving a warm or tbc VM."""
        figures = await self._figures.read(record) if self._figures is not None else None
        return status_of(record, cancel_requested, queue_position, figures)

    async def answer(
        self, record: MigrationRecord, cancel_requested: bool, correlation_id: str
    ) -> SourceCloneResponse:
        """:meth:`response` with the cache's figures (an answer to a command)."""
        return SourceCloneResponse(
            appliance_id=self._appliance_id,
            correlation_id=correlation_id,
            body=await self.status(record, cancel_requested),
        )

    def response(
        self,
        record: MigrationRecord,
        cancel_requested: bool,
        *,
        correlation_id: str | None = None,
        queue_position: int | None = None,
    ) -> SourceCloneResponse:
        return SourceCloneResponse(
            appliance_id=self._appliance_id,
            correlation_id=correlation_id or record.correlation_id,
            body=status_of(record, cancel_requested, queue_position),
        )

    async def publish(
        self,
        record: MigrationRecord,
        cancel_requested: bool = False,
        *,
        queue_position: int | None = None,
    ) -> None:
        response = SourceCloneResponse(
            appliance_id=self._appliance_id,
            correlation_id=record.correlation_id,
            body=await self.status(record, cancel_requested, queue_position),
        )
        try:
            await self._sink.publish(response, record.reply_to)
        except BusUnavailable as error:
            log.warning(
                "progress not published", migration_id=record.migration_id, error=str(error)
            )
