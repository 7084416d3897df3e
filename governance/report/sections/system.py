"""Section 2: system description (purpose, model, architecture, software environment)."""

from __future__ import annotations

from typing import Any

from governance.archive import package_versions
from governance.report.format import fnum, ftext, kv_rows, not_provided
from governance.report.inputs import ReportInputs


def task_text(tags: dict[str, str], cfg: dict[str, Any]) -> str | None:
    """The task and how the stage knew it (run tags ``governance.task`` / ``task_source``)."""
    task = tags.get("governance.task") or cfg.get("task")
    source = tags.get("governance.task_source")
    return f"{task} ({source})" if task and source else task


def build(inp: ReportInputs) -> dict[str, Any]:
    """Purpose and scope from the configuration; model facts, architecture and packages from MLflow."""
    ev, opts, m, cfg = inp.ev, inp.opts, inp.ev.model, inp.ev.config
    arch = m.architecture
    architecture = {
        "missing": None if arch else not_provided(m.architecture_note or "the model artifact could not be read"),
        "rows": kv_rows([("Model class", arch.get("class")), ("Parameters", fnum(arch.get("n_parameters"))),
                         ("Trainable parameters", fnum(arch.get("n_trainable"))),
                         ("Modules with parameters", fnum(len(arch.get("layers", []))))]) if arch else [],
        "layers": [{"module": str(x["module"]), "type": ftext(x.get("type")), "parameters": fnum(x["parameters"])}
                   for x in (arch or {}).get("layers", [])][:40],
    }
    return {
        "intended_purpose": opts.intended_purpose or not_provided("set report.intended_purpose in the configuration"),
        "purpose_missing": opts.intended_purpose is None,
        "out_of_scope": opts.out_of_scope,
        "out_of_scope_missing": None if opts.out_of_scope else not_provided("set report.out_of_scope"),
        "model_rows": kv_rows([("Task", task_text(ev.tags, cfg)), ("Flavours", m.flavors), ("PyTorch format", m.pytorch_format),
                               ("Input signature", m.signature_inputs), ("Output signature", m.signature_outputs),
                               ("Logged with MLflow", m.mlflow_version), ("Logged with torch", m.torch_version),
                               ("Model logged at (UTC)", m.created), ("Description", m.description)]),
        "architecture": architecture,
        "environment": [{"name": k, "version": v} for k, v in package_versions().items()],
        "requirements": m.requirements,
        "requirements_missing": None if m.requirements else not_provided("the model artifact has no requirements.txt"),
        "run_environment": kv_rows(sorted((ev.environment or {}).items())) if ev.environment else [],
    }
