"""Approval policies: the gates an approver applies to a run's logged evidence.

Separation of duties: the person who runs ``explain`` may configure gates of their own (they are
shown in the report), but what decides an approval is the approver's policy, evaluated by
``approve`` against the run's ``quality.json`` and ``stability.json`` after the evidence has been
verified. A policy is a YAML document::

    name: credit-models-2026
    description: what the policy requires and why
    gates:
      - {name: ..., metric: delta_auc, method: backtrace_signed, op: ">", threshold: random}

Gates are those of :mod:`governance.quality.gates`; besides every metric of quality.json,
``stability`` is available (the split-half Spearman rank correlation of each mode's global
importance, method ``backtrace_<mode>``).

Where the policy comes from, in order: ``approve --policy FILE`` or ``--policy NAME`` (a policy
shipped in ``governance/policies/``, e.g. ``default``); else the policy registered for the model:
the registered-model tag ``governance.policy`` holding a packaged policy's name, an MLflow artifact
URI of a policy file (``runs:/<id>/policy.yaml``, ``mlflow-artifacts:/...``) or the YAML itself,
optionally pinned by the tag ``governance.policy_sha256``. With neither, approval is refused.
The policy's SHA-256 (of its bytes) is recorded with the approval.
"""

from __future__ import annotations

import copy
import hashlib
import tempfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from governance.errors import PolicyError

REGISTERED_TAG = "governance.policy"
REGISTERED_SHA_TAG = "governance.policy_sha256"
_KEYS = {"name", "description", "gates"}
STABILITY_METRIC = "stability"


class PolicyMissing(PolicyError):
    """No policy was given and none is registered for the model (exit 3)."""


@dataclass(frozen=True)
class Policy:
    """A parsed approval policy and where it came from."""

    name: str
    source: str
    sha256: str
    gates: list[dict[str, Any]] = field(default_factory=list)
    description: str = ""

    def record(self) -> dict[str, str]:
        """What an approval records about the policy."""
        return {"name": f"{self.name} ({self.source})", "sha256": self.sha256}


def packaged_policies() -> list[str]:
    """Names of the policies shipped in ``governance/policies/``."""
    folder = resources.files("governance") / "policies"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def parse_policy(data: bytes, *, source: str) -> Policy:
    """Validate a policy document; a :class:`PolicyError` names what is wrong."""
    from governance.quality.gates import validate_gate

    try:
        doc = yaml.safe_load(data.decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError) as exc:
        raise PolicyError(f"policy {source}: not valid YAML ({exc})") from exc
    if not isinstance(doc, dict):
        raise PolicyError(f"policy {source}: must be a mapping with name and gates")
    unknown = sorted(set(doc) - _KEYS)
    if unknown:
        raise PolicyError(f"policy {source}: unknown key(s) {unknown}; known: {sorted(_KEYS)}")
    gates = doc.get("gates")
    if not isinstance(gates, list) or not gates:
        raise PolicyError(f"policy {source}: needs a non-empty list of gates")
    for gate in gates:
        try:
            validate_gate(gate)
        except ValueError as exc:
            raise PolicyError(f"policy {source}: {exc}") from exc
    name = str(doc.get("name") or Path(source).stem)
    return Policy(name=name, source=source, sha256=hashlib.sha256(data).hexdigest(), gates=list(gates),
                  description=str(doc.get("description") or ""))


def load_policy(spec: str) -> Policy:
    """The policy in the YAML file ``spec``, or the packaged policy named ``spec``."""
    path = Path(spec)
    if path.is_file():
        return parse_policy(path.read_bytes(), source=f"file {path}")
    if spec in packaged_policies():
        data = (resources.files("governance") / "policies" / f"{spec}.yaml").read_bytes()
        return parse_policy(data, source=f"packaged policy {spec!r}")
    raise PolicyError(f"--policy {spec}: no such file and no packaged policy of that name "
                      f"(packaged: {', '.join(packaged_policies())})")


def registered_policy(client: Any, model_name: str) -> Policy | None:
    """The policy registered for ``model_name`` (registered-model tags), or None."""
    tags = dict(client.get_registered_model(model_name).tags or {})
    value = tags.get(REGISTERED_TAG)
    if not value:
        return None
    label = f"registered-model tag {REGISTERED_TAG} of {model_name}"
    if value in packaged_policies():
        policy = load_policy(value)
        policy = Policy(policy.name, f"{label} -> {policy.source}", policy.sha256, policy.gates, policy.description)
    elif "\n" in value or value.lstrip().startswith(("name:", "gates:", "{")):
        policy = parse_policy(value.encode("utf-8"), source=f"{label} (inline YAML)")
    else:
        policy = parse_policy(_download(value), source=f"{label} -> {value}")
    pin = tags.get(REGISTERED_SHA_TAG)
    if pin and pin.strip().lower() != policy.sha256:
        raise PolicyError(f"the policy registered for {model_name} ({value}) has sha256 {policy.sha256}, "
                          f"not {pin} as pinned by {REGISTERED_SHA_TAG}; it changed since it was registered")
    return policy


def _download(uri: str) -> bytes:
    """The bytes of a policy file given by an MLflow artifact URI."""
    import mlflow
    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory(prefix="governance-policy-") as tmp:
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp))
        except (MlflowException, OSError) as exc:
            raise PolicyError(f"the registered policy {uri} cannot be downloaded: {exc}") from exc
        if not local.is_file():
            raise PolicyError(f"the registered policy {uri} is not a file")
        return local.read_bytes()


def resolve_policy(spec: str | None, client: Any, model_name: str) -> Policy:
    """``--policy`` when given, else the policy registered for the model; refuse without one."""
    if spec:
        return load_policy(spec)
    policy = registered_policy(client, model_name)
    if policy is None:
        raise PolicyMissing(
            f"no approval policy: give --policy FILE (or --policy default for the packaged one), or register one "
            f"for {model_name} (registered-model tag {REGISTERED_TAG}); the gates the explanation run chose do "
            "not decide an approval")
    return policy


def policy_facts(quality: dict[str, Any] | None, stability: dict[str, Any] | None) -> dict[str, Any]:
    """The document the gates are evaluated on: quality.json plus each mode's split-half stability
    as metric ``stability`` of method ``backtrace_<mode>``."""
    doc = copy.deepcopy(quality) if quality else {"methods": {}, "metrics": {}, "errors": {}}
    doc.setdefault("methods", {})
    doc.setdefault("metrics", {})
    for mode, v in ((stability or {}).get("modes") or {}).items():
        rho = (v or {}).get("spearman")
        if rho is not None:
            doc["methods"].setdefault(f"backtrace_{mode}", {})[STABILITY_METRIC] = rho
    doc["metrics"][STABILITY_METRIC] = {
        "direction": "higher",
        "description": "Spearman rank correlation of global importance between two random halves (stability.json)"}
    if not quality:
        doc.setdefault("errors", {})["quality.json"] = "the run logged no quality.json"
    return doc


def evaluate_policy(policy: Policy, quality: dict[str, Any] | None, stability: dict[str, Any] | None) -> dict[str, Any]:
    """``evaluate_gates`` of the policy's gates on :func:`policy_facts` (``passed``, ``gates``)."""
    from governance.quality.gates import evaluate_gates

    result = evaluate_gates(policy_facts(quality, stability), policy.gates)
    if not quality:
        for row in result["gates"]:
            if row.get("metric") != STABILITY_METRIC and not row["passed"]:
                row["reason"] = "the run logged no quality.json"
    return result
