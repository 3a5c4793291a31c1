"""The store's budget keys work the same in kv_connector_extra_config as in StoreConfig."""

from __future__ import annotations

import pytest

from kvreuse.connector.config import ConnectorConfig, ConnectorConfigError
from kvreuse.store.config import StoreConfig


def test_flat_store_keys_equal_nested_and_store_config(tmp_path):
    flat = {"device_bytes": "64MiB", "host_bytes": "1GiB", "disk_path": str(tmp_path), "disk_bytes": "2GiB"}
    a = ConnectorConfig.from_extra_config(flat).store
    b = ConnectorConfig.from_extra_config({"store": flat}).store
    assert a == b == StoreConfig.from_dict(flat)
    assert a.device_bytes == 64 << 20 and a.disk_bytes == 2 << 30


@pytest.mark.parametrize("extra,key", [
    ({"device_bytes": "-1GiB"}, "device_bytes"),
    ({"host_bytes": "lots"}, "host_bytes"),
    ({"device_bytes": "1GiB", "store": {"device_bytes": "2GiB"}}, "device_bytes"),
    ({"disk_path": "/proc/definitely/not/here", "disk_bytes": "1GiB"}, "disk_path"),
    ({"devices_bytes": "1GiB"}, "devices_bytes"),
])
def test_bad_flat_keys_name_the_key(extra, key):
    with pytest.raises(ConnectorConfigError, match=rf"^(store\.)?{key}:"):
        ConnectorConfig.from_extra_config(extra)


def test_patch_budget_key():
    assert ConnectorConfig.from_extra_config({}).policy.patch_budget == 0.05
    assert ConnectorConfig.from_extra_config({"policy": {"patch_budget": None}}).policy.patch_budget is None
    with pytest.raises(ConnectorConfigError, match="^policy.patch_budget:"):
        ConnectorConfig.from_extra_config({"policy": {"patch_budget": -0.1}})
