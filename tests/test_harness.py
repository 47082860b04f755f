import jax


def test_eight_emulated_devices():
    assert jax.device_count() == 8
    assert jax.default_backend() == "cpu"
