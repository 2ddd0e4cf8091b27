"""A fake `gs://` for the tests: every bucket is a folder of a local directory that all processes see.

Google Cloud Storage is reached by two clients in a run: `etils.epath` (through fsspec's `gs` protocol: gcsfs in
production) for every file bcr_jax writes, and TensorStore's `gcs` kvstore for orbax's array data (plus a
google-cloud-storage bucket lookup orbax makes). `install()` puts the fake behind all of them, with the object-store
semantics the code must live with: an object appears whole when its writer closes (never half a file), objects
cannot be appended to, and writing needs no parent "directory" but does need the bucket.

    FAKE_GCS_ROOT=/tmp/x           gs://bucket/key is /tmp/x/bucket/key; a bucket exists iff its folder does
    FAKE_GCS_READ_ONLY=b1,b2       buckets whose objects can be read but not written (a missing permission)

A process started as `python tests/fake_gcs.py -m bcr_jax.main ARGS` installs the fake and then runs the module, so a
subprocess (a SIGKILLed run, one of several JAX processes) shares the fake bucket with the test through the folder.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pathlib
import runpy
import sys
import types
import uuid

import fsspec
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem

_REGISTRY = importlib.import_module("fsspec.registry")._registry  # (`fsspec.registry` is the read-only view)
ROOT_ENV = "FAKE_GCS_ROOT"
READ_ONLY_ENV = "FAKE_GCS_READ_ONLY"
REPO = pathlib.Path(__file__).resolve().parents[1]


def root() -> str:
    try:
        return os.environ[ROOT_ENV]
    except KeyError:
        raise RuntimeError(f"fake gs:// used without ${ROOT_ENV}") from None


def local_path(url: str) -> pathlib.Path:
    """Where the fake keeps the object (or prefix) `url`."""
    assert url.startswith("gs://"), url
    return pathlib.Path(root()) / url.removeprefix("gs://")


class _ObjectWriter:
    """A file open for writing whose content replaces the target only on close: how a GCS upload finalizes."""

    def __init__(self, target: str, mode: str):
        self._target = target
        self._tmp = f"{target}.fake-gcs-upload-{uuid.uuid4().hex}"
        self._file = open(self._tmp, mode)  # noqa: SIM115  (closed in close())

    def __getattr__(self, name):
        return getattr(self._file, name)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()
        else:  # an upload that fails leaves the old object
            self._file.close()
            os.unlink(self._tmp)

    def close(self):
        if self._file.closed:
            return
        self._file.close()
        os.replace(self._tmp, self._target)

    @property
    def closed(self):
        return self._file.closed


class FakeGCSFileSystem(DirFileSystem):
    """fsspec's `gs` / `gcs` protocol over `$FAKE_GCS_ROOT` (takes and ignores gcsfs's options)."""

    protocol = ("gs", "gcs")

    def __init__(self, *args, **storage_options):
        del args, storage_options  # token=, project=, finalize_on_close=, ...: gcsfs options
        super().__init__(path=root(), fs=LocalFileSystem())

    def _check_bucket(self, path: str, *, write: bool) -> None:
        bucket = self._strip_protocol(path).split("/", 1)[0]
        if not os.path.isdir(os.path.join(self.path, bucket)):
            raise FileNotFoundError(f"gs://{bucket}: no such bucket")
        if write and bucket in os.environ.get(READ_ONLY_ENV, "").split(","):
            raise PermissionError(f"gs://{bucket}: 403 does not have storage.objects.create access")

    def open(self, path, mode="rb", **kwargs):
        path = self._strip_protocol(path)
        if "a" in mode or "+" in mode:
            raise NotImplementedError(f"gs://{path}: GCS objects cannot be appended to or updated in place")
        if "w" in mode or "x" in mode:
            self._check_bucket(path, write=True)
            target = self._join(path)
            os.makedirs(os.path.dirname(target), exist_ok=True)  # no directories on GCS: any key may be written
            return _ObjectWriter(target, mode.replace("x", "w"))
        self._check_bucket(path, write=False)
        return super().open(path, mode, **kwargs)

    def mkdir(self, path, create_parents=True, **kwargs):
        self._check_bucket(path, write=True)
        return super().mkdir(path, create_parents=create_parents, **kwargs)

    def makedirs(self, path, exist_ok=False):
        self._check_bucket(path, write=True)
        return super().makedirs(path, exist_ok=exist_ok)

    def rm(self, path, recursive=False, maxdepth=None):
        self._check_bucket(path if isinstance(path, str) else path[0], write=True)
        return super().rm(path, recursive=recursive, maxdepth=maxdepth)

    def mv(self, path1, path2, recursive=False, maxdepth=None, **kwargs):
        self._check_bucket(path2, write=True)
        return super().mv(path1, path2, recursive=recursive, maxdepth=maxdepth, **kwargs)


def _tensorstore_kvstore(ckpt_path: str) -> dict:
    """Orbax's TensorStore spec for a gs:// path, pointed at the fake's folder (the file driver)."""
    from orbax.checkpoint._src.path import gcs_utils

    bucket, key = gcs_utils.parse_gcs_path(ckpt_path, add_trailing_slash=False)
    if not os.path.isdir(os.path.join(root(), bucket)):
        raise FileNotFoundError(f"gs://{bucket}: no such bucket")
    return {"driver": "file", "path": os.path.join(root(), bucket, key)}


def _clear_caches() -> None:
    from etils.epath import backend

    FakeGCSFileSystem.clear_instance_cache()
    backend.fsspec_backend._get_filesystem.cache_clear()  # epath keeps one filesystem per protocol


def _fake_bucket(name: str):
    # orbax asks google-cloud-storage whether the bucket has a hierarchical namespace; the fake's has not.
    return types.SimpleNamespace(name=name, hierarchical_namespace_enabled=False)


def install() -> None:
    """Serves gs:// from $FAKE_GCS_ROOT in this process (epath, orbax and TensorStore)."""
    from orbax.checkpoint._src.path import gcs_utils

    root()  # fail now, not at the first write
    for protocol in FakeGCSFileSystem.protocol:
        fsspec.register_implementation(protocol, FakeGCSFileSystem, clobber=True)
    gcs_utils.get_kvstore_for_gcs = _tensorstore_kvstore
    gcs_utils.get_bucket = _fake_bucket
    _clear_caches()


@contextlib.contextmanager
def serve(directory: pathlib.Path, buckets=("bucket",)):
    """gs:// served from `directory` (buckets made as folders) in this process and in the processes it starts with
    `command()`, until the block ends."""
    from orbax.checkpoint._src.path import gcs_utils

    for bucket in buckets:
        (directory / bucket).mkdir(parents=True, exist_ok=True)
    saved_env = os.environ.get(ROOT_ENV)
    saved = dict(_REGISTRY), gcs_utils.get_kvstore_for_gcs, gcs_utils.get_bucket
    os.environ[ROOT_ENV] = str(directory)
    install()
    try:
        yield directory
    finally:
        registry, gcs_utils.get_kvstore_for_gcs, gcs_utils.get_bucket = saved
        _REGISTRY.clear()
        _REGISTRY.update(registry)
        _clear_caches()
        if saved_env is None:
            os.environ.pop(ROOT_ENV, None)
        else:
            os.environ[ROOT_ENV] = saved_env


def command(module: str = "bcr_jax.main") -> list[str]:
    """`python -m module` with the fake installed first (the subprocess inherits $FAKE_GCS_ROOT)."""
    return [sys.executable, __file__, "-m", module]


if __name__ == "__main__":  # python tests/fake_gcs.py -m MODULE ARGS...
    if len(sys.argv) < 3 or sys.argv[1] != "-m":
        sys.exit("usage: python tests/fake_gcs.py -m MODULE [ARGS...]")
    sys.path[0] = str(REPO)  # the checkout's bcr_jax, as `python -m` from the repository root would import
    install()
    module = sys.argv[2]
    sys.argv = [module, *sys.argv[3:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
