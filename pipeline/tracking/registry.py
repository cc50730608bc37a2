"""Champion/challenger bookkeeping over an MLflow model registry.

Every trained run becomes a new model version carrying its evidence as tags and the
alias `challenger` (the alias always moves to the newest candidate). The alias
`champion` moves only when the candidate's mean *validation* score is strictly
better than the champion's recorded `val_score` tag: a tie or a regression keeps the
old champion, so re-training with the same result never churns what is served.
A version's recorded evidence and decision are written once: registering the same run
again changes nothing.
Besides the evidence, every version carries its validation scores as `val/<metric>/<where>`
tags (7 fixed combinations, `mean`, `natural`) and what identifies it (`data`: corpus profile
or imported dataset, `seed`, `params_hash`, `options`, the run's `imer.method`/`imer.variant`/
`imer.trainable_params`): `imer compare --registry` (registry_compare.py) reads only these.
The functions take an `MlflowClient`, so any tracking/registry URI works (SQLite by
default in this project).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from pipeline.tracking.runs import fluent_uri

CHAMPION = "champion"
CHALLENGER = "challenger"
SCORE_TAG = "val_score"
ALREADY_REGISTERED = "already_registered"  # decision of a re-run on a registered run: a no-op
DATA_TAG = "data"  # the corpus profile (balanced, realistic) or imported dataset (iemocap4, mosi, ...)
UNKNOWN_DATA = "unknown"


@dataclass(frozen=True)
class RegistryDecision:
    """What `register_candidate` did, in a form that goes straight into reports/registry.json."""

    model_name: str
    version: str
    decision: str  # "promoted" | "kept" | "already_registered"
    reason: str
    candidate_score: float
    previous_champion_version: str | None
    previous_champion_score: float | None
    champion_version: str
    aliases: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def val_tag(metric: str, where: str) -> str:
    """Tag name of a validation score: `val/<metric>/<combination | mean | natural>` (e.g. `val/wa/atv`)."""
    return f"val/{metric}/{where}"


def val_score_tags(val: dict[str, Any]) -> dict[str, float]:
    """Every finite score of metrics.json's `val` section (`fixed` per combination and mean, `natural`) as tags."""
    entries = list((val.get("fixed") or {}).items()) + [("natural", val.get("natural") or {})]
    return {val_tag(metric, where): float(value) for where, scores in entries for metric, value in scores.items()
            if metric != "n" and isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value)}


def resolve_model_source(client: MlflowClient, run_id: str, artifact_name: str = "model") -> tuple[str, str | None]:
    """Return (source URI, logged-model id) of the model `artifact_name` logged by run `run_id`.

    MLflow 3 stores `log_model` output as a LoggedModel linked to its source run; older
    layouts keep an MLmodel under the run's artifacts. Both are accepted.
    """
    run = client.get_run(run_id)
    found = client.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run_id}' AND name = '{artifact_name}'",
    )
    if found:
        newest = max(found, key=lambda m: m.creation_timestamp)
        return f"models:/{newest.model_id}", newest.model_id
    names = {a.path for a in client.list_artifacts(run_id, artifact_name)}
    if f"{artifact_name}/MLmodel" in names:
        return f"{run.info.artifact_uri.rstrip('/')}/{artifact_name}", None
    raise MlflowException(f"run {run_id}: no logged model named {artifact_name!r} (run evaluate first)")


def register_candidate(
    run_id: str,
    model_name: str,
    val_score: float,
    evidence: dict[str, Any],
    client: MlflowClient,
    *,
    artifact_name: str = "model",
    greater_is_better: bool = True,
) -> RegistryDecision:
    """Register run `run_id`'s model as a challenger version and promote it only if strictly better.

    `evidence` values (hashes, git rev, per-combination scores, ...) become version tags;
    non-string values are stored as JSON. Re-registering a run that already has a version
    (with its decision recorded) is a no-op: no tag, score or alias is written, and the
    answer says so (decision `already_registered`). A version left without a decision by
    an interrupted registration is completed instead.
    """
    val_score = float(val_score)
    _ensure_registered_model(client, model_name)
    version = _existing_version_for_run(client, model_name, run_id)
    if version is not None:
        recorded = client.get_model_version(model_name, version)
        if "decision" in recorded.tags:  # complete: its evidence and decision stand as recorded
            return _already_registered(client, model_name, recorded, run_id)
    if version is None:
        source, model_id = resolve_model_source(client, run_id, artifact_name)
        # the registry resolves a `models:/m-...` source through mlflow's global tracking URI
        with fluent_uri(client.tracking_uri):
            version = client.create_model_version(
                model_name, source=source, run_id=run_id, model_id=model_id
            ).version
    version = str(version)
    for key, value in {**evidence, SCORE_TAG: val_score, "run_id": run_id}.items():
        client.set_model_version_tag(model_name, version, key, _tag_value(value))
    client.set_registered_model_alias(model_name, CHALLENGER, version)

    champion = _alias_version(client, model_name, CHAMPION)
    prev_version = None if champion is None else str(champion.version)
    prev_score = None if champion is None else float_or_none(champion.tags.get(SCORE_TAG))
    promote, reason = _compare(val_score, version, prev_version, prev_score, greater_is_better)
    theirs, ours = (None if champion is None else champion.tags.get(DATA_TAG)), evidence.get(DATA_TAG)
    if prev_version not in (None, version) and _known(theirs) and _known(ours) and theirs != ours:
        promote, reason = False, (f"champion v{prev_version} was selected on data {theirs!r}, this candidate on "
                                  f"{ours!r}: validation scores on different data do not compare; kept (register "
                                  "it under another register.model_name to serve it)")
    if promote:
        client.set_registered_model_alias(model_name, CHAMPION, version)
    decision = "promoted" if promote else "kept"
    client.set_model_version_tag(model_name, version, "decision", decision)
    client.set_model_version_tag(model_name, version, "reason", reason)
    if prev_version is not None:
        client.set_model_version_tag(model_name, version, "compared_to_version", prev_version)
    aliases = sorted(client.get_model_version(model_name, version).aliases)
    return RegistryDecision(
        model_name=model_name,
        version=version,
        decision=decision,
        reason=reason,
        candidate_score=val_score,
        previous_champion_version=prev_version,
        previous_champion_score=prev_score,
        champion_version=version if promote else str(prev_version),
        aliases=aliases,
    )


def _already_registered(client: MlflowClient, model_name: str, recorded: Any, run_id: str) -> RegistryDecision:
    """The no-op answer for a run that already has a complete version: nothing is written."""
    champion = _alias_version(client, model_name, CHAMPION)
    champ_version = None if champion is None else str(champion.version)
    score = float_or_none(recorded.tags.get(SCORE_TAG))
    reason = (f"run {run_id} is already registered as v{recorded.version} (recorded decision "
              f"{recorded.tags.get('decision')!r}, {SCORE_TAG} {recorded.tags.get(SCORE_TAG)}); nothing changed: "
              "a registered version's scores, decision and aliases are never rewritten")
    return RegistryDecision(
        model_name=model_name,
        version=str(recorded.version),
        decision=ALREADY_REGISTERED,
        reason=reason,
        candidate_score=float("nan") if score is None else score,
        previous_champion_version=champ_version,
        previous_champion_score=None if champion is None else float_or_none(champion.tags.get(SCORE_TAG)),
        champion_version=str(champ_version),
        aliases=sorted(recorded.aliases),
    )


def _compare(
    score: float, version: str, prev_version: str | None, prev_score: float | None, greater_is_better: bool
) -> tuple[bool, str]:
    """Decide promotion; every branch returns a reason worth reading in the registry UI."""
    if math.isnan(score):
        return False, "candidate val_score is NaN"
    if prev_version is None:
        return True, "first model: no champion yet"
    if prev_version == version:
        return False, "candidate already is the champion"
    if prev_score is None or math.isnan(prev_score):
        return False, f"champion v{prev_version} has no usable {SCORE_TAG} tag; not comparable, kept"
    better = score > prev_score if greater_is_better else score < prev_score
    if better:
        return True, f"val_score {score:.6g} beats champion v{prev_version} ({prev_score:.6g})"
    word = "ties" if score == prev_score else "does not beat"
    return False, f"val_score {score:.6g} {word} champion v{prev_version} ({prev_score:.6g})"


def _known(label: Any) -> bool:
    return label is not None and str(label) not in ("", "unknown")


def _ensure_registered_model(client: MlflowClient, name: str) -> None:
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="MCULoRA incomplete-multimodal emotion model")


def _existing_version_for_run(client: MlflowClient, name: str, run_id: str) -> str | None:
    for mv in client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'"):
        return str(mv.version)
    return None


def _alias_version(client: MlflowClient, name: str, alias: str):
    """The version behind `alias`, or None when the alias is not set yet."""
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _tag_value(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, default=str)


def float_or_none(value: str | None) -> float | None:
    try:
        return None if value is None else float(value)
    except ValueError:
        return None
