"""Where Ray Train keeps its resume points: a local path or a ``pyarrow.fs`` URI.

On one machine the default, ``runs/<name>/ray_train``, is fine. On a multi-node cluster every
training worker writes its checkpoints there and a restarted stage reads them back from another
node, so it must be storage all nodes reach (``s3://bucket/prefix``, ``gs://…``, an NFS path):
``run.train_storage``. The stage's own outputs (``checkpoints/<name>``) are copied to the run
directory on the driver once training ends; only the resume points live in this storage.
"""

from __future__ import annotations

from pathlib import Path

# Schemes pyarrow.fs resolves from a URI (checked when the config loads, not when a stage starts).
URI_SCHEMES = ("file", "s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")


def check_storage_uri(value: str) -> str:
    if "://" in value:
        scheme = value.split("://", 1)[0].lower()
        if scheme not in URI_SCHEMES:
            raise ValueError(f"unsupported storage scheme {scheme!r} (use a local path or one of "
                             f"{', '.join(s + '://' for s in URI_SCHEMES)})")
    return value


def resolve_storage(location: str | Path):
    """``(filesystem, path)`` of a local path or URI: what Ray Train's ``RunConfig`` takes as
    ``storage_filesystem`` / ``storage_path`` (a relative local path becomes absolute: Ray's
    workers need not share our working directory)."""
    import pyarrow.fs as pafs

    location = str(location)
    if "://" in location:
        return pafs.FileSystem.from_uri(location)
    return pafs.LocalFileSystem(), str(Path(location).expanduser().resolve())


def delete_tree(filesystem, path: str) -> None:
    """Remove a directory of ``filesystem`` and everything below it; nothing when it is absent."""
    import pyarrow.fs as pafs

    if filesystem.get_file_info(path).type == pafs.FileType.Directory:
        filesystem.delete_dir(path)
