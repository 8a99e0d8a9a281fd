"""Exporting a study: every event, every participant's result, submissions, prunes and baselines.

One bundle (:func:`export_bundle`) holds the study's configuration, the dashboard's numbers
(``results``, from :func:`study_analysis.study_results`, the very function the dashboard
uses) and tables of rows. It is written as CSV or Parquet files (a zip over HTTP, a folder
from the CLI) plus ``study.json``, or as one JSON document. The tables and their columns
are documented in docs/studies.md; floats are written exactly (CSV uses the shortest
repr that reads back to the same double), so the numbers reproduce the dashboard's.
"""

from __future__ import annotations

import csv
import io
import json
import zipfile
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db import utcnow
from app.errors import InvalidInput
from app.models_studies import Participant, Study, StudyEvent
from app.services import studies
from app.services.artifacts import ArtifactStore
from app.services.model_service import ModelService
from app.services.study_analysis import study_results

FORMATS = ("csv", "parquet", "json")
FORMAT_VERSION = 1

# name -> [(column, type)]; types: int, float, str, bool, time (UTC), json (text in CSV/Parquet)
TABLES: dict[str, list[tuple[str, str]]] = {
    "events": [("id", "int"), ("created_at", "time"), ("pseudonym", "str"), ("condition", "str"), ("kind", "str"),
               ("model_version", "int"), ("payload", "json")],
    "participants": [("pseudonym", "str"), ("condition", "str"), ("status", "str"), ("joined_at", "time"),
                     ("deadline_at", "time"), ("submitted", "bool"), ("submitted_at", "time"),
                     ("submitted_version", "int"), ("final_version", "int"), ("n_prunes", "int"), ("n_events", "int"),
                     ("target_correct", "int"), ("target_n", "int"), ("target_accuracy", "float"),
                     ("delta_vs_base", "float")],
    "submissions": [("pseudonym", "str"), ("condition", "str"), ("submitted_at", "time"), ("submitted_version", "int"),
                    ("n_prunes", "int"), ("prunes", "json"), ("target_correct", "int"), ("target_n", "int"),
                    ("target_accuracy", "float"), ("delta_vs_base", "float")],
    "prunes": [("pseudonym", "str"), ("condition", "str"), ("submitted", "bool"), ("final_version", "int"),
               ("class_name", "str"), ("concept", "str")],
    "baselines": [("name", "str"), ("k", "int"), ("seeds", "int"), ("target_correct", "int"), ("target_n", "int"),
                  ("target_accuracy", "float"), ("std", "float"), ("prunes", "json")],
    "random_runs": [("seed", "int"), ("k", "int"), ("target_correct", "int"), ("target_n", "int"),
                    ("target_accuracy", "float"), ("prunes", "json")],
}


def _participant_tables(results: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    participants, submissions, prunes = [], [], []
    for row in results["participants"]:
        participants.append({
            "pseudonym": row["pseudonym"], "condition": row["condition"], "status": row["status"],
            "joined_at": row["joined_at"], "deadline_at": row["deadline_at"], "submitted": row["submitted"],
            "submitted_at": row["submitted_at"], "submitted_version": row["submitted_version"],
            "final_version": row["final_version"], "n_prunes": row["n_prunes"], "n_events": row["n_events"],
            "target_correct": row["correct"], "target_n": row["n"], "target_accuracy": row["accuracy"],
            "delta_vs_base": row["delta_vs_base"]})
        if row["submitted"]:
            submissions.append({
                "pseudonym": row["pseudonym"], "condition": row["condition"], "submitted_at": row["submitted_at"],
                "submitted_version": row["submitted_version"], "n_prunes": row["n_prunes"], "prunes": row["prunes"],
                "target_correct": row["correct"], "target_n": row["n"], "target_accuracy": row["accuracy"],
                "delta_vs_base": row["delta_vs_base"]})
        for prune in row["prunes"]:
            prunes.append({"pseudonym": row["pseudonym"], "condition": row["condition"],
                           "submitted": row["submitted"], "final_version": row["final_version"], **prune})
    return {"participants": participants, "submissions": submissions, "prunes": prunes}


def _baseline_tables(results: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    base, random, oracle = results["base"], results["random"], results["oracle"]
    baselines = [
        {"name": "base", "k": 0, "seeds": None, "target_correct": base["correct"], "target_n": base["n"],
         "target_accuracy": base["accuracy"], "std": None, "prunes": []},
        {"name": "random", "k": random["k"], "seeds": random["seeds"], "target_correct": None,
         "target_n": base["n"], "target_accuracy": random["mean"], "std": random["std"], "prunes": None},
        {"name": "oracle", "k": oracle["k"], "seeds": None, "target_correct": oracle["correct"],
         "target_n": oracle["n"], "target_accuracy": oracle["accuracy"], "std": None, "prunes": oracle["prunes"]},
    ]
    runs = [{"seed": r["seed"], "k": random["k"], "target_correct": r["correct"], "target_n": r["n"],
             "target_accuracy": r["accuracy"], "prunes": r["prunes"]} for r in random["runs"]]
    return {"baselines": baselines, "random_runs": runs}


def event_rows(session: Session, study_id: int) -> list[dict[str, Any]]:
    """Every stored event of a study in the order it happened (server time, then id)."""
    conditions = dict(session.execute(select(Participant.id, Participant.condition)
                                      .where(Participant.study_id == study_id)).all())
    events = session.scalars(select(StudyEvent).where(StudyEvent.study_id == study_id)
                             .order_by(StudyEvent.created_at, StudyEvent.id))
    return [{"id": e.id, "created_at": e.created_at, "pseudonym": e.pseudonym,
             "condition": conditions.get(e.participant_id), "kind": e.kind, "model_version": e.model_version,
             "payload": e.payload} for e in events]


def summary_of(results: dict[str, Any]) -> dict[str, Any]:
    """The dashboard's headline numbers (the per-row data are in the tables)."""
    return {
        "target_split": results["target_split"], "n_target": results["n_target"], "k": results["k"],
        "k_source": results["k_source"], "base": results["base"],
        "random": {key: value for key, value in results["random"].items() if key != "runs"},
        "oracle": results["oracle"], "conditions": results["conditions"], "agreement": results["agreement"],
    }


def public_results(results: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers plus the participants table: what ``GET /studies/{id}/results`` returns."""
    return {**summary_of(results), "participants": _participant_tables(results)["participants"]}


def export_bundle(session: Session, svc: ModelService, artifacts: ArtifactStore, study: Study) -> dict[str, Any]:
    results = study_results(session, svc, artifacts, study)
    tables = {"events": event_rows(session, study.id), **_participant_tables(results), **_baseline_tables(results)}
    return {"format_version": FORMAT_VERSION, "exported_at": utcnow(), "study": studies.study_summary(session, study),
            "results": summary_of(results), "tables": tables}


# -- writing ---------------------------------------------------------------------------------------

def _plain(value: Any) -> Any:
    """JSON-ready: datetimes as ISO 8601 (UTC), everything else as it is."""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _dumps(value: Any, **kwargs: Any) -> str:
    return json.dumps(_plain(value), allow_nan=False, ensure_ascii=False, **kwargs)


def _csv_cell(value: Any, kind: str) -> str:
    if value is None:
        return ""
    if kind == "json":
        return _dumps(value, sort_keys=True)
    if kind == "bool":
        return "true" if value else "false"
    if kind == "time":
        return value.isoformat()
    if kind == "float":
        return repr(float(value))
    return str(value)


def table_csv(name: str, rows: list[dict[str, Any]]) -> bytes:
    columns = TABLES[name]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([column for column, _ in columns])
    for row in rows:
        writer.writerow([_csv_cell(row.get(column), kind) for column, kind in columns])
    return buffer.getvalue().encode()


def table_parquet(name: str, rows: list[dict[str, Any]]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    types = {"int": pa.int64(), "float": pa.float64(), "str": pa.string(), "bool": pa.bool_(),
             "time": pa.timestamp("us", tz="UTC"), "json": pa.string()}
    columns = TABLES[name]
    arrays = []
    for column, kind in columns:
        values = [row.get(column) for row in rows]
        if kind == "json":
            values = [None if v is None else _dumps(v, sort_keys=True) for v in values]
        arrays.append(pa.array(values, type=types[kind]))
    table = pa.Table.from_arrays(arrays, schema=pa.schema([(c, types[k]) for c, k in columns]))
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def study_json(bundle: dict[str, Any]) -> bytes:
    """The configuration and the dashboard numbers (without the tables)."""
    head = {key: value for key, value in bundle.items() if key != "tables"}
    return (_dumps({**head, "tables": sorted(bundle["tables"])}, indent=2) + "\n").encode()


def full_json(bundle: dict[str, Any]) -> bytes:
    return (_dumps(bundle, indent=1) + "\n").encode()


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise InvalidInput(f"unknown export format {fmt!r}; choose {', '.join(FORMATS)}")
    return fmt


def files(bundle: dict[str, Any], fmt: str) -> dict[str, bytes]:
    """File name -> content: one file per table plus study.json, or one JSON file."""
    check_format(fmt)
    study_id = bundle["study"]["id"]
    if fmt == "json":
        return {f"study-{study_id}.json": full_json(bundle)}
    write = table_csv if fmt == "csv" else table_parquet
    out = {f"{name}.{fmt}": write(name, rows) for name, rows in bundle["tables"].items()}
    out["study.json"] = study_json(bundle)
    return out


def zipped(bundle: dict[str, Any], fmt: str) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, content in sorted(files(bundle, fmt).items()):
            archive.writestr(f"study-{bundle['study']['id']}/{name}", content)
    return buffer.getvalue()


def write_folder(bundle: dict[str, Any], fmt: str, folder: str | Path) -> list[Path]:
    """Write the export's files into ``folder`` (created if needed); returns their paths."""
    target = Path(folder)
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for name, content in sorted(files(bundle, fmt).items()):
        path = target / name
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_bytes(content)
        temporary.replace(path)
        written.append(path)
    return written
