"""sharding/mesh.py: mesh shapes from cfg.mesh and the errors of bad ones (8 CPU devices)."""
import jax
import pytest

from sharding.mesh import MESH_AXES, make_mesh, mesh_shape


@pytest.mark.parametrize("cfg, want", [
    ({"data": -1}, (8, 1, 1, 1, 1)),
    ({"data": -1, "fsdp": 2}, (4, 2, 1, 1, 1)),
    ({"data": 1, "fsdp": -1, "tensor": 2}, (1, 4, 2, 1, 1)),
    ({"fsdp": 2, "tensor": 2, "expert": 2}, (1, 2, 2, 2, 1)),
    ({"data": 2, "sequence": 4}, (2, 1, 1, 1, 4)),
])
def test_make_mesh_shapes(cfg, want):
    mesh = make_mesh(cfg)
    assert mesh.axis_names == MESH_AXES
    assert tuple(mesh.shape[a] for a in MESH_AXES) == want
    assert sorted(d.id for d in mesh.devices.flat) == list(range(8))


def test_make_mesh_on_a_subset_of_devices():
    mesh = make_mesh({"data": -1, "tensor": 2}, devices=jax.devices()[:4])
    assert dict(mesh.shape)["data"] == 2 and mesh.devices.size == 4


def test_mesh_shape_any_device_count():
    assert mesh_shape({"data": -1, "fsdp": 16, "expert": 8}, 256)["data"] == 2
    assert mesh_shape({"fsdp": -1, "tensor": 8}, 64) == {
        "data": 1, "fsdp": 8, "tensor": 8, "expert": 1, "sequence": 1}


@pytest.mark.parametrize("cfg, match", [
    ({"data": 3}, r"multiply to 3, but there are 8 devices"),
    ({"data": 2, "fsdp": 2}, r"data=2, fsdp=2.*multiply to 4"),
    ({"data": -1, "pipeline": 2}, r"unknown axes \['pipeline'\]"),
    ({"data": -1, "fsdp": -1}, r"\['data', 'fsdp'\] are all -1"),
    ({"data": -1, "tensor": 3}, r"mesh.data=-1.*3.*does not divide the 8 devices"),
    ({"data": 0}, r"mesh.data=0 must be a positive int or -1"),
    ({"data": 2.0, "fsdp": 4}, r"mesh.data=2.0 must be a positive int"),
])
def test_bad_mesh_config_raises(cfg, match):
    with pytest.raises(ValueError, match=match):
        make_mesh(cfg)
