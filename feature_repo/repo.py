"""Module-level Feast objects for the ``feast`` CLI (``feast apply`` collects module attributes).

Everything else builds the objects with :func:`build_definitions`; this wrapper only binds
them to names, reading the Parquet sources from ``data/`` beside this file.
"""

from pathlib import Path

from stratarec.feature_repo.definitions import build_definitions

# One attribute per object, named like "featureview_user_activity": the CLI finds them with dir().
globals().update({f"{type(o).__name__.lower()}_{o.name}": o for o in build_definitions(str(Path(__file__).resolve().parent / "data"))})
