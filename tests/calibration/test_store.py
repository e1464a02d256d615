import gc

import pytest
import torch

from prunekit.calibration import ActivationStore
from prunekit.errors import PrunekitError


@pytest.mark.parametrize("offload", ["none", "cpu", "disk"])
def test_rows_round_trip_in_the_store_dtype(offload, tmp_path):
    store = ActivationStore((4, 3, 2), torch.bfloat16, "cpu", offload, tmp_path)
    values = torch.randn(4, 3, 2)
    store.write(slice(0, 4), values)
    assert store.read(slice(1, 3)).dtype == torch.bfloat16
    assert torch.equal(store.tensor(), values.to(torch.bfloat16))
    store.close()
    store.close()
    with pytest.raises(PrunekitError, match="was closed"):
        store.read(slice(0, 1))
    assert list(tmp_path.iterdir()) == []


def test_a_forgotten_disk_store_deletes_its_file(tmp_path):
    store = ActivationStore((2, 2), torch.float32, "cpu", "disk", tmp_path)
    assert len(list(tmp_path.iterdir())) == 1 and store.path.startswith(str(tmp_path))
    del store
    gc.collect()
    assert list(tmp_path.iterdir()) == []


def test_unwritable_offload_directory_is_a_one_line_error(tmp_path):
    with pytest.raises(PrunekitError, match="cannot create an activation file"):
        ActivationStore((2, 2), torch.float32, "cpu", "disk", tmp_path / "missing")
