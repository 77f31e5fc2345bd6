"""Package a released bundle: save it to the BentoML model store and build the Bento that serves it.

Both functions use the stores under ``$BENTOML_HOME`` (the pipeline sets it to
``<workspace>/bentoml``). BentoML resolves that variable once per process, at its first
store access; the functions refuse to run if it has changed since, rather than write into a
store nobody will read.

There is no "promote" step here: BentoML 1.4 model labels are immutable (``ModelInfo`` is
frozen and no public API edits them), so which model is in production is recorded by
``stratarec.registry`` (``production.json``), and each model's labels say what was true
when it was saved.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import bentoml
import yaml

from stratarec.bundle import CONFIG_FILE, ITEMS_FILE, LINEAGE_FILE
from stratarec.config import StrataConfig
from stratarec.model.sequential import ARCH_FILE, WEIGHTS_FILE
from stratarec.schema import FEATURE_SERVICE
from stratarec.training import ITEM_IDS_FILE

log = logging.getLogger(__name__)

BENTOFILE = Path(__file__).with_name("bentofile.yaml")
# What the service cannot start without (layers are optional: cold start then uses global popularity).
REQUIRED_BUNDLE_FILES: tuple[str, ...] = (WEIGHTS_FILE, ARCH_FILE, ITEM_IDS_FILE, ITEMS_FILE, CONFIG_FILE)
_LINEAGE_KEYS = ("git_sha", "config_fingerprint", "seed", "data_window", "feature_service", "trained_at", "n_users", "n_items")


def _check_bentoml_home() -> Path:
    """The BentoML home in use, after checking it is the one ``$BENTOML_HOME`` names."""
    # BentoMLContainer is BentoML's own settings object; 1.4 exposes no public accessor for it.
    from bentoml._internal.configuration.containers import BentoMLContainer

    home = Path(BentoMLContainer.bentoml_home.get()).resolve()
    wanted = os.environ.get("BENTOML_HOME")
    if wanted and Path(wanted).expanduser().resolve() != home:
        raise RuntimeError(
            f"BENTOML_HOME is {wanted} but BentoML already uses {home} in this process: set BENTOML_HOME before the first BentoML call"
        )
    return home


def save_to_model_store(bundle_dir: Path, cfg: StrataConfig, labels: dict, metadata: dict) -> str:
    """Copy a bundle into a new version of ``cfg.serving.model_name`` in the BentoML model store.

    Args:
        bundle_dir: A complete bundle (weights, item ids, items, config; layers optional).
        cfg: Run config; gives the model name and the config fingerprint.
        labels: String labels, e.g. ``{"stage": "production", "run_id": ...}``; values are
            converted with ``str``.
        metadata: JSON-serialisable metadata, merged over the bundle's lineage (git SHA,
            config fingerprint, seed, data window, feature service).

    Returns:
        The new model's tag, e.g. ``stratarec_recommender:7xq3...``.

    Raises:
        FileNotFoundError: The bundle lacks a file the service needs.
    """
    bundle_dir = Path(bundle_dir)
    missing = [f for f in REQUIRED_BUNDLE_FILES if not (bundle_dir / f).is_file()]
    if missing:
        raise FileNotFoundError(f"bundle {bundle_dir} lacks {missing}: it cannot be served")
    home = _check_bentoml_home()
    lineage = json.loads((bundle_dir / LINEAGE_FILE).read_text()) if (bundle_dir / LINEAGE_FILE).is_file() else {}
    meta = {k: lineage[k] for k in _LINEAGE_KEYS if k in lineage}
    meta.setdefault("config_fingerprint", cfg.fingerprint())
    meta.setdefault("feature_service", FEATURE_SERVICE)
    meta.update(metadata)
    started = time.perf_counter()
    with bentoml.models.create(
        name=cfg.serving.model_name,
        labels={str(k): str(v) for k, v in labels.items()},
        metadata=json.loads(json.dumps(meta, default=str)),  # BentoML accepts plain JSON types only
    ) as model:
        # The model folder *is* the bundle: the service opens it with RecommenderBundle(model.path).
        shutil.copytree(bundle_dir, model.path, dirs_exist_ok=True)
    log.info("saved %s to the model store in %s (%.1fs)", model.tag, home, time.perf_counter() - started)
    return str(model.tag)


def _default_project_root() -> Path | None:
    """The source checkout this module lives in, or None in a normal (non-editable) install."""
    root = Path(__file__).resolve().parent.parent
    return root if (root / "pyproject.toml").is_file() else None


def build_bento(cfg: StrataConfig, model_tag: str, project_root: Path | None = None) -> str:
    """Build the Bento of the recommender service with ``model_tag`` packed in.

    Build options come from ``serving/bentofile.yaml``. The build context is a temporary
    folder holding only the files its ``include`` names (copied from ``project_root``), so
    the build never walks a large checkout (``.venv``, ``runs``).

    Args:
        cfg: Run config; gives the Bento name and lineage labels.
        model_tag: Model store tag from :func:`save_to_model_store`.
        project_root: Where the ``include`` files are read; default: this checkout, if any.

    Returns:
        The Bento tag, e.g. ``stratarec_service:4bq2...``; serve it with
        ``bentoml serve <tag>`` (same ``BENTOML_HOME``).
    """
    home = _check_bentoml_home()
    spec = yaml.safe_load(BENTOFILE.read_text())
    root = Path(project_root) if project_root is not None else _default_project_root()
    labels = {
        **spec.get("labels", {}),
        "model_tag": model_tag,
        "config_fingerprint": cfg.fingerprint(),
        "run_id": cfg.run_id,
        "feature_service": FEATURE_SERVICE,
    }
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="stratarec-bento-ctx-") as ctx:
        copied = []
        for pattern in spec.get("include", []):
            for src in sorted(root.glob(pattern)) if root is not None else []:
                if src.is_file():
                    dest = Path(ctx) / src.relative_to(root)
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(src, dest)
                    copied.append(str(src.relative_to(root)))
        bento = bentoml.bentos.build(
            spec["service"],
            name=cfg.serving.bento_name,
            description=spec.get("description"),
            labels={str(k): str(v) for k, v in labels.items()},
            include=spec.get("include"),
            python=spec.get("python"),
            docker=spec.get("docker"),
            models=[model_tag],
            build_ctx=ctx,
        )
    log.info("built %s with %s and %s in %s (%.1fs)", bento.tag, model_tag, copied or "no extra files", home, time.perf_counter() - started)
    return str(bento.tag)
