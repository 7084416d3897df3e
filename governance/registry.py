"""Model-version tags that describe one coherent governance state, and the ``audited`` alias.

A registered model version carries, as ``governance.*`` tags, which run holds its latest
explanation, which run holds the report of that explanation (with the report id and the
manifest's SHA-256), and whether that report is approved. Every change goes through the three
``record_*`` functions below, so the tags never mix two states:

=============================  =========================================================================
tag                            meaning
=============================  =========================================================================
``status``                     ``explained`` | ``reported`` | ``approved`` | ``rejected``: where the
                               version's current evidence stands
``explained_run_id``           the run that holds the latest explanation (``run_id``: the same, kept
                               for readers of the older tag)
``report_run_id``              the run whose report is of that explanation (absent until reported)
``report_id``                  that report's id
``manifest_sha256``            SHA-256 of that run's current ``governance/manifest.json`` (the anchor)
``approval_state``             ``approved`` | ``rejected`` | ``superseded`` (absent: never decided)
``audited``                    ``true`` only while ``approval_state`` is ``approved``
``approved_run_id``            the run whose report was approved
``approved_manifest_sha256``   the manifest hash at approval (``verify --run-id`` checks it)
``approval_policy``            the approver's policy (name and source) and
``approval_policy_sha256``     its SHA-256
``superseded_by_run_id``       the run whose newer explanation or report superseded the approval,
``superseded_reason``          and why
=============================  =========================================================================

A new explanation or report on an approved version supersedes the approval: ``audited`` becomes
``false``, ``approval_state`` ``superseded``, and the alias ``audited`` is **removed** (not moved
to an older version: which version serves is a decision for a person, and ``models:/name@audited``
must never resolve to evidence that is no longer the latest). ``approve`` on the new report sets
it again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

PREFIX = "governance."
ALIAS = "audited"
#: Tags of the report of the current explanation (cleared when a newer explanation arrives).
_REPORT_TAGS = ("report_run_id", "report_id", "manifest_sha256")
#: Tags of an approval (cleared on rejection).
_APPROVED_TAGS = ("approved_run_id", "approved_manifest_sha256", "approval_policy", "approval_policy_sha256")
_SUPERSEDED_TAGS = ("superseded_by_run_id", "superseded_reason")


@dataclass
class VersionState:
    """The governance tags of one model version, read as one state."""

    name: str
    version: str
    tags: dict[str, str]
    aliases: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def get(self, key: str) -> str | None:
        """The value of tag ``governance.<key>`` (None when absent or empty)."""
        return self.tags.get(PREFIX + key) or None

    @property
    def status(self) -> str | None:
        return self.get("status")

    @property
    def current_run_id(self) -> str | None:
        """The run holding the version's latest explanation."""
        return self.get("explained_run_id") or self.get("run_id")

    @property
    def report_run_id(self) -> str | None:
        return self.get("report_run_id")

    @property
    def approval_state(self) -> str | None:
        return self.get("approval_state")

    @property
    def approved_run_id(self) -> str | None:
        return self.get("approved_run_id")

    @property
    def audited(self) -> bool:
        """True while the approval of the current evidence stands."""
        return self.approval_state == "approved" and self.get("audited") == "true"


def _client(client: Any = None, tracking_uri: str | None = None) -> Any:
    import mlflow

    return client or mlflow.MlflowClient(tracking_uri=tracking_uri)


def version_state(client: Any, name: str, version: str) -> VersionState:
    """The current governance state of ``name`` version ``version``."""
    mv = client.get_model_version(name, str(version))
    return VersionState(name, str(mv.version), dict(mv.tags or {}), sorted(mv.aliases or []))


def _write(client: Any, state: VersionState, set_tags: Mapping[str, str], delete: tuple[str, ...] = ()) -> None:
    """Set and delete ``governance.*`` tags, keeping ``state.tags`` in step."""
    for key, value in set_tags.items():
        client.set_model_version_tag(state.name, state.version, PREFIX + key, str(value))
        state.tags[PREFIX + key] = str(value)
    for key in delete:
        if PREFIX + key in state.tags and key not in set_tags:
            client.delete_model_version_tag(state.name, state.version, PREFIX + key)
            del state.tags[PREFIX + key]


def _remove_alias(client: Any, state: VersionState) -> None:
    """Remove the ``audited`` alias when it points at this version."""
    if ALIAS in state.aliases:
        client.delete_registered_model_alias(state.name, ALIAS)
        state.aliases.remove(ALIAS)


def _supersede(client: Any, state: VersionState, by_run_id: str, reason: str) -> None:
    """Mark the standing approval superseded and take the alias away."""
    _write(client, state, {"approval_state": "superseded", "audited": "false", "superseded_by_run_id": by_run_id,
                           "superseded_reason": reason})
    _remove_alias(client, state)
    state.notes.append(f"the approval of run {state.approved_run_id} is superseded ({reason}); "
                       f"alias '{ALIAS}' removed from {state.name} version {state.version}")


def record_explained(name: str, version: str, run_id: str, *, client: Any = None,
                     tracking_uri: str | None = None) -> VersionState:
    """Call after a run explained ``name`` version ``version``: it becomes the version's current
    evidence; a report of older evidence no longer describes it; an approval is superseded."""
    client = _client(client, tracking_uri)
    state = version_state(client, name, version)
    if state.approval_state == "approved":
        _supersede(client, state, run_id, f"re-explained in run {run_id}")
    stale = tuple(_REPORT_TAGS) if state.report_run_id and state.report_run_id != run_id else ()
    _write(client, state, {"explained_run_id": run_id, "run_id": run_id, "status": "explained"}, delete=stale)
    return state


def record_reported(name: str, version: str, run_id: str, report_id: str, manifest_sha256: str, *,
                    client: Any = None, tracking_uri: str | None = None) -> VersionState:
    """Call after ``report`` on ``run_id``: the version's report tags point at it and an approval
    of the version is superseded. A report of a run that is no longer the version's latest
    explanation leaves the version's tags as they are (a note says so)."""
    client = _client(client, tracking_uri)
    state = version_state(client, name, version)
    current = state.current_run_id
    if current and current != run_id:
        state.notes.append(f"run {run_id} is not the latest explanation of {name} version {version} "
                           f"(run {current} is); the version's tags are unchanged")
        return state
    if state.approval_state == "approved":
        _supersede(client, state, run_id, f"report re-rendered in run {run_id}")
    _write(client, state, {"explained_run_id": run_id, "run_id": run_id, "report_run_id": run_id,
                           "report_id": report_id, "manifest_sha256": manifest_sha256, "status": "reported"})
    return state


def record_decision(name: str, version: str, run_id: str, decision: str, manifest_sha256: str | None, *,
                    policy: Mapping[str, str] | None = None, client: Any = None,
                    tracking_uri: str | None = None) -> VersionState:
    """Call after a sign-off on the report in ``run_id``: ``approve`` sets the approval tags and
    moves the alias ``audited`` to this version; ``reject`` clears them and removes the alias
    from this version. ``manifest_sha256`` is the (re-issued) manifest's hash."""
    client = _client(client, tracking_uri)
    state = version_state(client, name, version)
    current = {"manifest_sha256": manifest_sha256} if manifest_sha256 else {}
    if decision == "approve":
        tags = {"status": "approved", "approval_state": "approved", "audited": "true", "approved_run_id": run_id,
                "approved_manifest_sha256": manifest_sha256 or "", **current}
        if policy:
            tags["approval_policy"] = policy["name"]
            tags["approval_policy_sha256"] = policy["sha256"]
        _write(client, state, tags, delete=_SUPERSEDED_TAGS)
        client.set_registered_model_alias(name, ALIAS, state.version)
        state.aliases = sorted(set(state.aliases) | {ALIAS})
    else:
        _write(client, state, {"status": "rejected", "approval_state": "rejected", "audited": "false", **current},
               delete=_APPROVED_TAGS + _SUPERSEDED_TAGS)
        _remove_alias(client, state)
    return state


def approved_manifest_anchor(client: Any, run_id: str, run_tags: Mapping[str, str]) -> tuple[str, str] | None:
    """``(label, sha256)`` of the manifest hash recorded at approval on the model version that
    ``run_id`` explains, when that version's standing approval is of this run; else None."""
    from mlflow.exceptions import MlflowException

    from governance.report.evidence import resolve_model_version

    mv = resolve_model_version(client, run_tags.get(PREFIX + "model_uri"))
    if mv is None:
        return None
    try:
        state = version_state(client, mv.name, str(mv.version))
    except MlflowException:
        return None
    digest = state.get("approved_manifest_sha256")
    if state.approval_state == "approved" and state.approved_run_id == run_id and digest:
        return f"model version {state.name}/{state.version} (tag {PREFIX}approved_manifest_sha256)", digest
    return None
