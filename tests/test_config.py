"""TrainingConfig: one typed tree, YAML/JSON loading with inheritance, overrides and aggregated errors."""

import json

import pytest
import torch
import yaml

from decode_accel.errors import DecodeAccelError
from decode_accel.training.config import (
    TrainingConfig, config_reference_markdown, load_config, save_config,
)


def write_yaml(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


def test_seed_readme_example_constructs_and_maps_shortcuts_into_the_tree():
    cfg = TrainingConfig(
        epochs=100, batch_size=16, learning_rate=1e-3,
        optimizer={"type": "AdamW", "weight_decay": 1e-4, "amsgrad": True},
        scheduler={"type": "OneCycleLR", "max_lr": 1e-2, "pct_start": 0.3, "anneal_strategy": "cos"},
        regularization={"dropout": 0.1, "batch_norm": True, "weight_decay": 1e-4},
        training_strategy={"mixed_precision": True, "gradient_clipping": 1.0, "accumulate_grad_batches": 1,
                           "early_stopping_patience": 20},
        loss_scheduling={"enable": True, "schedule_type": "linear", "warmup_epochs": 10,
                         "final_weights": {"ch1_weight": 1.0, "ch2_weight": 1.0, "ratio_weight": 0.8,
                                           "conservation_weight": 0.2}},
        monitoring={"log_every": 50, "validate_every": 5, "save_every": 10, "plot_every": 20},
    )
    assert cfg.training_strategy.epochs == 100 and cfg.epochs == 100
    assert cfg.data.batch_size == 16 and cfg.batch_size == 16
    assert cfg.optimizer.lr == 1e-3 and cfg.learning_rate == 1e-3
    assert cfg.training_strategy.mixed_precision == "bf16"
    assert cfg.scheduler.kwargs == {"max_lr": 1e-2, "pct_start": 0.3, "anneal_strategy": "cos"}
    assert cfg.scheduler.step_interval == "step"  # OneCycleLR is defined per optimizer update


def test_optimizer_section_builds_the_named_torch_optimizer_with_its_arguments():
    cfg = TrainingConfig(learning_rate=3e-3, optimizer={"type": "AdamW", "weight_decay": 1e-4, "amsgrad": True,
                                                        "betas": [0.8, 0.99]})
    opt = cfg.optimizer.build(torch.nn.Linear(2, 2).parameters())
    assert isinstance(opt, torch.optim.AdamW)
    group = opt.param_groups[0]
    assert (group["lr"], group["weight_decay"], group["amsgrad"], tuple(group["betas"])) == \
        (3e-3, 1e-4, True, (0.8, 0.99))


def test_sgd_rejects_adam_only_arguments_and_suggests_a_close_name():
    with pytest.raises(Exception, match="SGD takes no 'betas'"):
        TrainingConfig(optimizer={"type": "SGD", "betas": [0.9, 0.99]})
    with pytest.raises(Exception, match="did you mean 'nesterov'"):
        TrainingConfig(optimizer={"type": "SGD", "momentum": 0.9, "nesterow": True})


def test_tweaking_one_argument_of_the_default_schedule_keeps_the_others():
    assert load_config(None, ["scheduler.gamma=0.5"]).scheduler.kwargs == {"step_size": 10, "gamma": 0.5}


def test_step_scheduler_without_step_size_is_reported():
    with pytest.raises(Exception, match="StepLR needs step_size"):
        TrainingConfig(scheduler={"type": "StepLR", "gamma": 0.5})


def test_conflicting_shortcut_and_section_value_is_an_error():
    with pytest.raises(Exception, match="conflicts"):
        TrainingConfig(epochs=3, training_strategy={"epochs": 4})


def test_yaml_with_base_inheritance_and_dotted_overrides(tmp_path):
    (tmp_path / "presets").mkdir()
    write_yaml(tmp_path / "presets" / "base.yaml", {
        "training_strategy": {"epochs": 50, "seed": 7},
        "optimizer": {"type": "Adam", "lr": 1e-3},
        "curriculum": [{"until_epoch": 5, "lr": 1e-3}],
    })
    child = write_yaml(tmp_path / "child.yaml", {
        "base": "presets/base.yaml",
        "training_strategy": {"epochs": 20},
        "data": {"batch_size": 8},
    })
    cfg = load_config(child, ["training_strategy.mixed_precision=bf16", "optimizer.lr=5e-4",
                              "curriculum.0.lr=2e-4", "data.data_path=null"])
    assert cfg.training_strategy.epochs == 20          # child wins over base
    assert cfg.training_strategy.seed == 7             # base value merged in
    assert cfg.optimizer.type == "Adam"
    assert cfg.optimizer.lr == 5e-4                    # override parsed as a YAML float
    assert cfg.training_strategy.mixed_precision == "bf16"
    assert cfg.curriculum[0].lr == 2e-4                # list entries addressed by index
    assert cfg.data.batch_size == 8 and cfg.data.data_path is None


def test_json_config_and_no_file_at_all(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"epochs": 3}))
    assert load_config(path).epochs == 3
    assert load_config(None, ["training_strategy.epochs=5"]).epochs == 5


def test_inheritance_cycle_is_named(tmp_path):
    write_yaml(tmp_path / "a.yaml", {"base": "b.yaml"})
    write_yaml(tmp_path / "b.yaml", {"base": "a.yaml"})
    with pytest.raises(DecodeAccelError, match="cycle a.yaml -> b.yaml -> a.yaml"):
        load_config(tmp_path / "a.yaml")


def test_unknown_key_names_the_dotted_path_and_suggests_the_field(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {"training_strategy": {"epoch": 5}})
    with pytest.raises(DecodeAccelError) as info:
        load_config(path)
    assert "training_strategy.epoch: unknown key (did you mean 'epochs'?)" in str(info.value)
    with pytest.raises(DecodeAccelError, match="monitorng: unknown key \\(did you mean 'monitoring'\\?\\)"):
        load_config(None, ["monitorng.log_every=3"])
    with pytest.raises(DecodeAccelError, match="did you mean 'AdamW'"):
        load_config(None, ["optimizer.type=Adamw"])


def test_several_bad_values_are_reported_together_in_one_error(tmp_path):
    path = write_yaml(tmp_path / "bad.yaml", {
        "data": {"batch_size": 0},
        "optimizer": {"lr": -1.0},
        "training_strategy": {"mixed_precision": "fp8", "epochs": 5},
        "checkpointing": {"mode": "minimum"},
    })
    with pytest.raises(DecodeAccelError) as info:
        load_config(path)
    text = str(info.value)
    lines = text.splitlines()
    assert lines[0].startswith(f"{path}: 4 problems")
    for key in ("data.batch_size", "optimizer.lr", "training_strategy.mixed_precision", "checkpointing.mode"):
        assert any(line.strip().startswith(key + ":") for line in lines[1:]), key


def test_malformed_override_and_missing_file_are_one_line_errors(tmp_path):
    with pytest.raises(DecodeAccelError, match="has no '='"):
        load_config(None, ["training_strategy.epochs"])
    with pytest.raises(DecodeAccelError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_save_then_load_gives_the_same_resolved_config(tmp_path):
    cfg = TrainingConfig(epochs=7, batch_size=4, scheduler={"type": "MultiStepLR", "milestones": [2, 5]},
                         curriculum=[{"until_epoch": 3, "lr": 1e-4, "loss_weights": {"bg": 0.5}}])
    for name in ("run.yaml", "run.json"):
        path = save_config(cfg, tmp_path / name)
        assert load_config(path) == cfg
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no temporary files left


def test_curriculum_stages_must_end_in_increasing_order():
    with pytest.raises(Exception, match="must increase"):
        TrainingConfig(curriculum=[{"until_epoch": 5}, {"until_epoch": 3}])


def test_regularization_weight_decay_becomes_the_optimizer_weight_decay():
    assert TrainingConfig(regularization={"weight_decay": 0.01}).optimizer.weight_decay == 0.01


def test_reference_table_lists_every_leaf_field_with_its_description():
    table = config_reference_markdown()
    assert "| training_strategy.epochs | int | 100 | training epochs (count) |" in table
    assert "| checkpointing.mode | min \\| max |" in table
    assert "loss_scheduling.schedules.NAME.decay_rate" in table
    rows = [r for r in table.splitlines()[2:] if "| section |" not in r]
    assert all(r.count("|") >= 5 and r.rstrip(" |").split("|")[-1].strip() for r in rows)


def test_two_channel_simulation_needs_a_two_channel_model_and_loss():
    with pytest.raises(Exception) as info:
        TrainingConfig(simulation={"channels": {"n_channels": 2}})
    assert "simulation.channels.n_channels is 2" in str(info.value)
    cfg = TrainingConfig(model={"architecture": "DoubleMUNet"}, simulation={"channels": {"n_channels": 2}},
                         loss={"type": "Unified"})
    assert cfg.model.architecture == "DoubleMUNet"
    with pytest.raises(Exception, match="GaussianMM is single-channel"):
        TrainingConfig(model={"architecture": "DoubleMUNet"}, simulation={"channels": {"n_channels": 2}})


def test_regularization_settings_reach_the_network_section():
    cfg = TrainingConfig(regularization={"dropout": 0.1, "batch_norm": True},
                         training_strategy={"gradient_checkpointing": True})
    assert (cfg.model.dropout, cfg.model.norm, cfg.model.gradient_checkpointing) == (0.1, "batch", True)
    with pytest.raises(Exception, match="conflicts with model.dropout"):
        TrainingConfig(regularization={"dropout": 0.1}, model={"dropout": 0.2})


def test_curriculum_overrides_are_checked_against_the_simulation_section():
    cfg = TrainingConfig(curriculum=[{"until_epoch": 2, "simulation": {"emitters.photons_mean": 8000.0}},
                                     {"until_epoch": 4, "simulation": {"background": {"uniform": [5, 10]}}}])
    assert cfg.simulation_for_stage(0).emitters.photons_mean == 8000.0
    assert cfg.simulation_for_stage(1).background.uniform == (5.0, 10.0)
    assert cfg.simulation.emitters.photons_mean != 8000.0  # the base section is untouched
    with pytest.raises(DecodeAccelError, match="curriculum.0.simulation"):
        load_config(None, ["curriculum=[{until_epoch: 2, simulation: {emitters.photon_mean: 1}}]"])


def test_the_config_and_the_training_stream_read_a_stages_simulation_overrides_alike():
    """One override applier: a stage the config accepts is the physics the stream simulates. Short names
    (density, bg) and a density that replaces the section's emitters_per_frame are read as the stream reads them;
    a misspelt field is refused by name."""
    from decode_accel.data.stream import apply_overrides
    from decode_accel.training.config.dicts import flatten_dict

    stages = [{"until_epoch": 2, "simulation": {"density": 2.0}},
              {"until_epoch": 3, "simulation": {"emitters": {"density": 3.0}}},
              {"until_epoch": 4, "simulation": {"bg": [5, 10]}}]
    cfg = TrainingConfig(simulation={"emitters": {"emitters_per_frame": 5.0, "density": None}}, curriculum=stages)
    first, second, third = (cfg.simulation_for_stage(i) for i in range(3))
    assert (first.emitters.density, first.emitters.emitters_per_frame) == (2.0, None)
    assert (second.emitters.density, second.emitters.emitters_per_frame) == (3.0, None)
    assert third.background.uniform == (5.0, 10.0) and third.emitters.emitters_per_frame == 5.0
    for i, stage in enumerate(cfg.curriculum):  # the stream applies the hook's flattened overrides to its config
        assert cfg.simulation_for_stage(i) == apply_overrides(cfg.simulation, flatten_dict(stage.simulation))
    with pytest.raises(DecodeAccelError, match=r"curriculum\.0\.simulation does not fit.*emitters\.densty"):
        load_config(None, ["curriculum=[{until_epoch: 2, simulation: {emitters.densty: 1}}]"])


def test_seed_loss_scheduler_entries_validate_per_type():
    cfg = TrainingConfig(loss_scheduling={"enable": True, "schedules": {
        "ch1_weight": {"type": "constant", "value": 1.0},
        "ratio_weight": {"type": "linear", "start_value": 0.1, "end_value": 0.8, "start_epoch": 10, "end_epoch": 50},
        "conservation_weight": {"type": "exponential", "start_value": 0.01, "end_value": 0.2, "decay_rate": 0.1},
        "uncertainty_weight": {"type": "cosine", "min_value": 0.05, "max_value": 0.15, "period": 20}}})
    assert cfg.loss_scheduling.schedules["ratio_weight"].end_epoch == 50
    with pytest.raises(DecodeAccelError, match="loss_scheduling.schedules.w: a cosine schedule needs min_value"):
        load_config(None, ["loss_scheduling.schedules={w: {type: cosine, max_value: 1, period: 3}}"])


def test_the_operating_point_section_defaults_to_on_and_checks_its_tuning_physics():
    config = TrainingConfig()
    assert config.operating_point.enable and config.tuning_simulation() is None  # the training physics
    meant_for = TrainingConfig(operating_point={"simulation": {"emitters.density": 0.037}})
    assert meant_for.tuning_simulation().emitters.density == 0.037 and meant_for.simulation.emitters.density != 0.037
    assert not load_config(None, ["operating_point.enable=false"]).operating_point.enable
    with pytest.raises(DecodeAccelError, match=r"operating_point\.simulation does not fit.*emitters\.densty"):
        load_config(None, ["operating_point.simulation={emitters.densty: 0.1}"])
