"""Where cached calibration activations live while the layer-by-layer pipeline runs.

A calibration set of 256 windows of 2048 tokens at d = 4096 is 4 GiB in fp16: too much to keep next to a model on a
small accelerator, and sometimes too much for RAM. :class:`ActivationStore` holds one ``[n, L, d]`` activation tensor
on the compute device (``none``), in host memory (``cpu``) or in a raw memory-mapped temporary file (``disk``; no
pickle, no extra format), and hands out mini-batches on the compute device. The temporary file is deleted when the
store is closed, or when it is garbage collected at the latest.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import weakref
from pathlib import Path

import torch

from prunekit.errors import PrunekitError

OFFLOAD_MODES = ("none", "cpu", "disk")


def check_offload(offload: str) -> str:
    """Validate an ``offload`` option once, where the user gave it."""
    if offload not in OFFLOAD_MODES:
        raise PrunekitError(f"unknown offload mode '{offload}'; use one of: {', '.join(OFFLOAD_MODES)}")
    return offload


def _remove_file(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


class ActivationStore:
    """One ``[n, L, d]`` activation tensor, held on the device, on the CPU or on disk, read and written by rows."""

    def __init__(
        self,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        device: torch.device | str,
        offload: str = "none",
        directory: str | Path | None = None,
    ):
        self.shape = tuple(shape)
        self.dtype = dtype
        self.device = torch.device(device)
        self.offload = check_offload(offload)
        self.path: str | None = None
        self._finalizer = None
        if offload == "disk":
            self._data = self._map_file(directory)
        else:
            home = self.device if offload == "none" else torch.device("cpu")
            self._data = torch.empty(self.shape, dtype=dtype, device=home)

    def _map_file(self, directory: str | Path | None) -> torch.Tensor:
        """A tensor backed by a fresh temporary file (written through, so the OS may page it out)."""
        count = 1
        for size in self.shape:
            count *= size
        nbytes = count * torch.empty((), dtype=self.dtype).element_size()
        try:
            handle, path = tempfile.mkstemp(prefix="prunekit-activations-", suffix=".raw", dir=directory)
        except OSError as error:
            raise PrunekitError(f"cannot create an activation file in '{directory}': {error.strerror}") from error
        self.path = path
        self._finalizer = weakref.finalize(self, _remove_file, path)
        try:
            os.ftruncate(handle, max(nbytes, 1))
        except OSError as error:
            self.close()
            raise PrunekitError(
                f"cannot reserve {nbytes} bytes for activations in "
                f"'{path}': {error.strerror}"
            ) from error
        finally:
            os.close(handle)
        return torch.from_file(path, shared=True, size=count, dtype=self.dtype).view(self.shape)

    @property
    def rows(self) -> int:
        return self.shape[0]

    def read(self, rows: slice, device: torch.device | None = None) -> torch.Tensor:
        """Rows ``rows`` on ``device`` (the store's compute device by default); may be a view of the store."""
        self._check_open()
        return self._data[rows].to(device or self.device)

    def write(self, rows: slice, values: torch.Tensor) -> None:
        """Overwrite rows ``rows`` with ``values`` (any device; cast to the store's dtype)."""
        self._check_open()
        self._data[rows].copy_(values)

    def tensor(self, device: torch.device | str | None = None) -> torch.Tensor:
        """All rows as one tensor (a copy unless already on ``device``); for small sets and tests."""
        self._check_open()
        return self._data.to(device or self.device)

    def close(self) -> None:
        """Free the memory and delete the backing file, if any. Safe to call twice."""
        self._data = None
        if self._finalizer is not None:
            self._finalizer()  # unlinks the file once; the mapping itself goes with the last reference

    @property
    def closed(self) -> bool:
        return self._data is None

    def _check_open(self) -> None:
        if self._data is None:
            raise PrunekitError("this activation store was closed; its layer has already been processed")

    def __repr__(self) -> str:
        where = self.path if self.offload == "disk" else self.offload
        return f"ActivationStore(shape={self.shape}, dtype={self.dtype}, offload={where})"
