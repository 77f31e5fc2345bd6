"""A small file registry of the production model, and lineage helpers.

The registry is one JSON file under the workspace. The package stage writes it only after
the Bento exists, through an atomic rename, so a failed or gated run can never leave a
half-promoted model behind. The next run's gate reads it to compare against production.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from stratarec.atomic import write_json_atomic

REGISTRY_FILE = "production.json"


class ProductionRecord(BaseModel):
    """What is in production, and how it got there."""

    model_config = ConfigDict(extra="forbid")

    model_id: str
    model_dir: str
    model_tag: str = ""
    bento_tag: str = ""
    run_id: str = ""
    promoted_at: str
    metrics: dict[str, float] = {}
    reason: str = ""


def registry_dir(workspace: Path) -> Path:
    """Folder of the registry file and the promoted model copies."""
    return Path(workspace) / "registry"


def read_production(workspace: Path) -> ProductionRecord | None:
    """The current production record, or None on a first run."""
    path = registry_dir(workspace) / REGISTRY_FILE
    if not path.exists():
        return None
    return ProductionRecord.model_validate_json(path.read_text())


def copy_bundle_atomic(bundle_dir: Path, workspace: Path, model_id: str) -> Path:
    """Copy a bundle into ``<workspace>/registry/models/<model_id>`` via a temporary folder."""
    dest = registry_dir(workspace) / "models" / model_id
    if dest.exists():
        return dest
    tmp = dest.with_name(f".{model_id}.{uuid.uuid4().hex[:6]}.tmp")
    shutil.copytree(bundle_dir, tmp)
    tmp.rename(dest)
    return dest


def promote(record: ProductionRecord, workspace: Path) -> Path:
    """Make ``record`` the production model (atomic replace) and keep a history line."""
    reg = registry_dir(workspace)
    write_json_atomic(reg / REGISTRY_FILE, record.model_dump())
    with (reg / "history.jsonl").open("a") as f:
        f.write(json.dumps(record.model_dump()) + "\n")
    return reg / REGISTRY_FILE


def git_sha(cwd: Path | None = None) -> str:
    """Commit of the code that trained the model; ``unknown`` outside a git checkout.

    Container images have no ``.git``: their build bakes the SHA into ``STRATAREC_GIT_SHA``.
    """
    baked = os.environ.get("STRATAREC_GIT_SHA")
    if baked:
        return baked
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5, check=True)
        sha = out.stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd, capture_output=True, text=True, timeout=5)
        return sha + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def utc_now() -> str:
    """ISO timestamp in UTC."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
