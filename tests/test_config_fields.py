"""The config system's promise: `--config.a.b=value` overrides any field, and a mistyped
key is an error that names the nearest field, never a silently added one."""
import os
import subprocess
import sys

import ml_collections as mlc
import pytest
from absl import flags
from ml_collections import config_flags

from configs.base import get_base_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = {int: ("7", 7), float: ("0.5", 0.5), str: ("some/path", "some/path")}
# None-default fields that are whole sub-configs (set by a family or a variant: `,moe`).
SUBCONFIGS = {"model.rope_scaling", "model.mla", "model.moe", "model.ssm"}


def none_fields(cfg, prefix=""):
    """{dotted name: placeholder type or None} of every field whose value is None."""
    out = {}
    for key in cfg.keys():
        value = cfg[key]
        if isinstance(value, mlc.ConfigDict):
            out.update(none_fields(value, f"{prefix}{key}."))
        elif value is None:
            ref = cfg._fields[key]
            out[f"{prefix}{key}"] = ref.get_type() if isinstance(ref, mlc.FieldReference) else None
    return out


def parse(config_arg, overrides):
    argv = ["prog", f"--config={REPO}/configs/{config_arg}", *overrides]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config", flag_values=fv, sys_argv=argv)
    fv(argv)
    return fv.config


@pytest.mark.parametrize("config_arg", ["llama3.py:tiny", "deepseek_v3.py:tiny"])
def test_every_none_default_can_be_set_from_the_command_line(config_arg):
    module, _, variant = config_arg.partition(".py:")
    import importlib
    defaults = importlib.import_module(f"configs.{module}").get_config(variant)
    fields = none_fields(defaults)
    untyped = {k for k, t in fields.items() if t is None}
    assert untyped <= SUBCONFIGS, f"None defaults without a type: {untyped - SUBCONFIGS}"
    typed = {k: t for k, t in fields.items() if t is not None}
    assert "optim.qk_clip_tau" in typed and "train.init_from" in typed  # the walk finds them
    cfg = parse(config_arg, [f"--config.{k}={SAMPLE[t][0]}" for k, t in typed.items()])
    for key, t in typed.items():
        node = cfg
        for part in key.split("."):
            node = node[part]
        assert node == SAMPLE[t][1], key


def test_base_declares_the_optional_fields_the_code_reads():
    c = get_base_config()
    for key in ("muon_lr", "muon_ns_steps", "muon_per_head", "moonlight_rms", "qk_clip_tau"):
        assert key in c.optim, key
    for key in ("dropout", "attention_dropout"):
        assert key in c.model, key
    assert "init_from" in c.train


def test_family_configs_are_locked_against_typos():
    from configs.gpt2 import get_config
    cfg = get_config("tiny")
    with pytest.raises((AttributeError, KeyError), match='Did you mean "dropout"'):
        cfg.model.dropuot = 0.1
    cfg.model.dropout = 0.1                       # existing fields stay settable


def test_unknown_key_on_the_command_line_is_a_one_line_config_error(tmp_path):
    workdir = tmp_path / "w"
    p = subprocess.run([sys.executable, "train.py", "--config=configs/llama3.py:tiny",
                        f"--workdir={workdir}", "--config.model.dropuot=0.1"],
                       cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert p.returncode == 2
    assert "config error" in p.stderr and 'Did you mean "dropout"' in p.stderr
    assert "--config.model.dropuot" in p.stderr and "Traceback" not in p.stderr
    assert not workdir.exists()
