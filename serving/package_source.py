"""Where a replica finds its model package, on whichever node Serve placed it.

A replica gets the package as a string in its ``user_config``, not as files, and a cluster's nodes share no disk.
So a package reaches a replica one of three ways:

- **in storage** (``s3://BUCKET/.../packages/VERSION``, published by ``pneumonia run`` / ``evaluate``): copied into
  the node's cache once per version, verified, then loaded (``models.package_store.fetch``);
- **shipped with the job**: ``pneumonia serve --model artifacts/VERSION --address HEAD`` joins the cluster with
  the folder as a ``runtime_env`` ``py_modules`` entry (:func:`runtime_env`; Serve takes local folders only in a
  job's runtime_env, not a deployment's); Ray uploads it once through the cluster's GCS, the replicas inherit it,
  and Ray unpacks it on each node that runs one, onto ``sys.path``, where :func:`local_path` finds it by its
  version folder's name;
- **a folder the node has** (a local Ray, a shared disk, a volume in a KubeRay pod): used as it is.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from models.package import METADATA_FILE
from models.package_store import fetch, is_uri


def runtime_env(package: str) -> dict[str, Any]:
    """The ``runtime_env`` that carries the local package folder ``package`` to every node running a replica."""
    return {"py_modules": [str(Path(package).resolve())]}


def shipped(package: str) -> Path | None:
    """The copy of ``package`` Ray unpacked on this node for the deployment (``runtime_env``), if any."""
    name = Path(package.rstrip("/")).name
    for entry in sys.path:
        candidate = Path(entry) / name
        if "runtime_resources" in entry and (candidate / METADATA_FILE).is_file():
            return candidate
    return None


def local_path(package: str) -> str:
    """A folder on this node holding ``package``: fetched from storage, the copy shipped with the deployment, or
    ``package`` itself."""
    if is_uri(package):
        return str(fetch(package))
    return str(shipped(package) or package)
