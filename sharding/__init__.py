"""Meshes, logical-axis rules, sharded state and parallel strategies (DESIGN.md, sharding/).

    import sharding
    mesh = sharding.make_mesh(cfg.mesh)                       # data, fsdp, tensor, expert, sequence
    rules = sharding.rules_for_mesh(mesh)                     # or sharding.make_rules("fsdp_tp")
    model = sharding.create_sharded_model(cfg.model, mesh, rules, seed=cfg.seed)
    with sharding.activate(mesh, rules):                      # constrain() and expert parallelism
        ...                                                   # trace / run the train step here

mesh.py    the mesh from cfg.mesh
rules.py   logical -> mesh axes (presets dp, fsdp, fsdp_tp, fsdp_ep, fsdp_tp_ep, +sequence), constrain
state.py   shardings of parameters / optimizer state / batches; models created sharded
expert.py  expert parallelism: all_to_all dispatch inside shard_map (capacity and dropless)
"""
from sharding.mesh import MESH_AXES, make_mesh, mesh_shape
from sharding.rules import (
                            PRESETS,
                            Rules,
                            activate,
                            active_mesh,
                            active_rules,
                            check_model_config,
                            check_rules,
                            constrain,
                            logical_to_spec,
                            make_rules,
                            rules_for_mesh,
)
from sharding.state import (
                            batch_sharding,
                            batch_spec,
                            bytes_per_device,
                            create_sharded,
                            create_sharded_model,
                            shard_batch,
                            shard_state,
                            state_shardings,
                            variable_spec,
)

__all__ = [
    "MESH_AXES", "PRESETS", "Rules", "activate", "active_mesh", "active_rules", "batch_sharding",
    "batch_spec", "bytes_per_device", "check_model_config", "check_rules", "constrain",
    "create_sharded", "create_sharded_model", "logical_to_spec", "make_mesh", "make_rules",
    "mesh_shape", "rules_for_mesh", "shard_batch", "shard_state", "state_shardings", "variable_spec",
]
