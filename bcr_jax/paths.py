"""Workdir paths: local directories and `gs://` buckets (any fsspec URL) through one type, `etils.epath.Path`.

Every file bcr_jax writes or reads in a workdir goes through here: the run files, metrics, checkpoints (orbax takes
the same paths), the exported HF directory, evaluation cells and reports, solve output, the toy pipeline's results.
`pathlib` would collapse `gs://b/run` into the local path `gs:/b/run`.

`gs://` needs gcsfs (epath's backend without TensorFlow) and google-cloud-storage (orbax's bucket lookup):
`pip install 'bcr_jax[gcs]'`.

Atomic writes: a local file is written next to its target and renamed over it; a GCS object is replaced whole when
its upload finishes (readers see the old object or the new one, never part), so it is written in place — a rename
on GCS would be a second, full copy.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import socket
import tempfile

from etils import epath

Path = epath.Path
PathLike = str | os.PathLike
_COPY_CHUNK = 16 * 2**20


def is_remote(path) -> bool:
    """gs://, s3://, ...: a URL rather than a local path."""
    return "://" in os.fspath(path)


def resolve(path) -> epath.Path:
    """A workdir (or a file in one) as an epath: URLs as they are, local paths made absolute (orbax wants absolute
    paths) with `~` expanded."""
    if is_remote(path):
        return epath.Path(path)
    return epath.Path(pathlib.Path(path).expanduser().absolute())


def write_atomic(path, data: str | bytes) -> None:
    """Writes the whole file so that no reader (or a resumed run) ever sees half of it."""
    path = resolve(path)
    data = data.encode("utf-8") if isinstance(data, str) else data
    if is_remote(path):
        path.write_bytes(data)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    tmp.write_bytes(data)
    os.replace(tmp, path)


def put_file(local: pathlib.Path, dest, *, move: bool = False) -> None:
    """Copies (or moves) a local file to `dest`, atomically: a local `dest` by a rename, a remote one by a single
    upload."""
    dest = resolve(dest)
    if not is_remote(dest):
        dest.parent.mkdir(parents=True, exist_ok=True)
        if move:
            os.replace(local, dest)  # callers stage next to the target: the same file system
            return
        tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}"
        shutil.copyfile(local, tmp)
        os.replace(tmp, dest)
        return
    with open(local, "rb") as src, dest.open("wb") as dst:
        shutil.copyfileobj(src, dst, _COPY_CHUNK)
    if move:
        os.unlink(local)


def staging_dir(dest) -> pathlib.Path:
    """A fresh local directory to write files in before `put_file(..., move=True)` puts them under `dest`: inside
    `dest` when it is local (so the move is a rename), in the system temp directory when it is a URL. The caller
    removes it."""
    dest = resolve(dest)
    if is_remote(dest):
        return pathlib.Path(tempfile.mkdtemp(prefix="bcr_jax-staging-"))
    dest.mkdir(parents=True, exist_ok=True)
    return pathlib.Path(tempfile.mkdtemp(prefix=".staging-", dir=os.fspath(dest)))


def _bucket(path: epath.Path) -> epath.Path:
    scheme, rest = os.fspath(path).split("://", 1)
    return epath.Path(f"{scheme}://{rest.split('/', 1)[0]}")


def check_writable(path, key: str) -> epath.Path:
    """Fails early, naming `key` and the path, when the directory cannot be written: a missing bucket, missing
    credentials or permissions, gcsfs not installed, a read-only local directory. Writes and removes one small
    probe object (one per host and process: every process of a multi-host run writes checkpoints). Returns the
    resolved path."""
    from bcr_jax.build import ConfigError

    path = resolve(path)
    probe = path / f".write_check.{socket.gethostname()}.{os.getpid()}"
    try:
        if is_remote(path):
            # Asked first: making the directory would try to *create* a missing bucket (gcsfs does).
            if not _bucket(path).exists():
                raise ConfigError(f"{key}: {path}: bucket {_bucket(path)} does not exist (or these credentials "
                                  "cannot see it)")
        else:
            path.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except ConfigError:
        raise
    except ImportError as e:
        raise ConfigError(f"{key}: {path}: {e} (pip install 'bcr_jax[gcs]')") from None
    except Exception as e:  # noqa: BLE001  (auth, HTTP and OS errors: all say the same thing to the user)
        raise ConfigError(f"{key}: {path} is not writable: {type(e).__name__}: {e}") from None
    return path
