"""Config: strict loading, one-line errors naming the key, presets, the resolved config on disk."""

from __future__ import annotations

import dataclasses

import pytest

from common import config as C
from common.config import (
    ConfigError,
    TrainConfig,
    from_yaml_text,
    help_table,
    load_config,
    save_resolved,
    to_yaml,
)


def test_defaults_validate_and_equal_demo_preset():
    assert load_config() == load_config("demo")
    assert load_config("configs/demo.yaml") == TrainConfig()


def test_every_field_has_a_default_and_help():
    rows = help_table()
    assert len(rows) > 80
    for key, _default, text in rows:
        assert text and len(text) > 10, f"{key} has no help text"


def test_every_dataclass_field_documented_recursively():
    def walk(cls):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} lacks help"
            assert f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
            if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory()):
                walk(type(f.default_factory()))

    walk(TrainConfig)


def test_overrides_are_typed():
    cfg = load_config(
        None, ["tree.w=16", "tree.d=8", "learner.lr=1e-6", "algo.whiten=false", "learner.betas=[0.9,0.95]"]
    )
    assert cfg.tree.w == 16 and isinstance(cfg.tree.w, int)
    assert cfg.learner.lr == 1e-6
    assert cfg.algo.whiten is False
    assert list(cfg.learner.betas) == [0.9, 0.95]


@pytest.mark.parametrize(
    "override, key",
    [
        ("tree.w=abc", "tree.w"),
        ("no.such.key=1", "no"),
        ("tree.nope=1", "tree.nope"),
        ("learner.lr=fast", "learner.lr"),
        ("algo.whiten=maybe", "algo.whiten"),
    ],
)
def test_bad_overrides_name_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    msg = str(e.value)
    assert "\n" not in msg
    assert key in msg


@pytest.mark.parametrize(
    "overrides, key, fix",
    [
        (["tree.root_divergence_max=9"], "tree.root_divergence_max", "<= 8"),
        (["tree.root_divergence_min=3", "tree.root_divergence_max=2"], "root_divergence_min", "min <= max"),
        (["tree.max_response_tokens=200"], "tree.max_response_tokens", "<= 128"),
        (["learner.mini_batch_prompts=16"], "learner.mini_batch_prompts", "<= 8"),
        (["learner.mini_batch_prompts=3"], "learner.mini_batch_prompts", "divisor"),
        (["tree.l=40", "tree.align_segments_to_blocks=true"], "tree.l", "multiple of 32"),
        (["tree.mode=bushy"], "tree.mode", "tree, flat"),
        (["tree.w=0"], "tree.w", ">= 1"),
        (["algo.dual_clip=0.5"], "algo.dual_clip", "> 1"),
        (["learner.fsdp=true", "driver=local"], "learner.fsdp", "driver=ray"),
        (["reward.fn=nonsense"], "reward.fn", "package.module:function"),
        (["sampling.top_p=1.5"], "sampling.top_p", "(0, 1]"),
        (["learner.num_workers=3"], "learner.num_workers", "multiple"),
        (["reward.correct=-1", "reward.wrong=1"], "reward.correct", "reward.correct > reward.wrong"),
    ],
)
def test_inconsistent_values_fail_with_key_and_fix(overrides, key, fix):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    msg = str(e.value)
    assert "\n" not in msg
    assert key in msg and fix in msg, msg


def test_a_replaced_key_names_its_replacement():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["tree.answer_tail_chars=200"])
    msg = str(e.value)
    assert "\n" not in msg and "tree.answer_tail_chars" in msg and "tree.answer_overlap_tokens" in msg


def test_flat_mode_allows_any_root_divergence_setting():
    cfg = load_config(None, ["tree.mode=flat", "tree.root_divergence_max=9", "tree.root_divergence_min=9"])
    assert cfg.tree.mode == "flat"


def test_preset_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config("no-such-preset")
    bad = tmp_path / "bad.yaml"
    bad.write_text("tree:\n  w: [1, 2\n")
    with pytest.raises(ConfigError, match="YAML"):
        load_config(bad)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("tree:\n  width: 4\n")
    with pytest.raises(ConfigError, match="tree.width"):
        load_config(unknown)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listy)


def test_override_without_equals():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["tree.w"])


def test_hydra_style_plus_overrides_are_plain_overrides():
    """``+key=value`` / ``++key=value`` (Hydra's add / force) set an existing key like ``key=value``;
    an unknown key is refused by its own name, not as '+...'."""
    assert load_config(None, ["+tree.w=4", "++learner.lr=0.5"]).tree.w == 4
    assert load_config(None, ["++learner.lr=0.5"]).learner.lr == 0.5
    with pytest.raises(ConfigError, match=r"unknown key 'tree.width'"):
        load_config(None, ["+tree.width=4"])


def test_preset_then_override_precedence(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text("tree:\n  w: 4\n  root_divergence_max: 2\nlearner:\n  lr: 0.5\n")
    cfg = load_config(p, ["learner.lr=0.25"])
    assert cfg.tree.w == 4 and cfg.learner.lr == 0.25


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["tree.w=16", "run_dir=" + str(tmp_path / "run")])
    path = save_resolved(cfg, cfg.run_dir)
    assert path.read_text() == to_yaml(cfg)
    assert from_yaml_text(path.read_text()) == cfg


def test_config_module_imports_no_heavy_packages():
    import subprocess
    import sys

    code = (
        "import sys; import common.config; "
        "bad = [m for m in ('torch', 'ray', 'vllm', 'redis') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_all_presets_load():
    for preset in sorted(C.PRESET_DIR.glob("*.yaml")):
        load_config(preset)


def _choice_fields(cls=TrainConfig, prefix=""):
    for f in dataclasses.fields(cls):
        if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory()):
            yield from _choice_fields(type(f.default_factory()), f"{prefix}{f.name}.")
        elif "choices" in f.metadata:
            yield f"{prefix}{f.name}", f


def test_allowed_values_are_the_literal_declared_with_the_field():
    import typing

    declared = dict(_choice_fields())
    assert len(declared) == 27
    assert declared["tree.mode"].metadata["choices"] == typing.get_args(C.TreeMode) == ("tree", "flat")
    assert declared["learner.packing"].metadata["choices"] == typing.get_args(C.PackingMode)
    assert declared["sync.receiver"].metadata["choices"] == typing.get_args(C.SyncReceiver)
    assert declared["model.dtype"].metadata["choices"] == declared["learner.param_dtype"].metadata["choices"]
    for key, f in declared.items():
        assert f.default in f.metadata["choices"], key
        bad = "zzz" if key != "driver" else "remote"
        with pytest.raises(ConfigError, match=f"{key}='{bad}' is not one of "):
            load_config(None, [f"{key}={bad}"])


def test_a_choice_needs_a_literal_holding_its_default():
    from typing import Literal

    with pytest.raises(TypeError, match="Literal"):
        C.choice(Literal["a", "b"], "c", "help text")
    with pytest.raises(TypeError, match="Literal"):
        C.choice(str, "a", "help text")


def test_lowest_values_are_declared_with_the_field():
    (tree_w,) = [f for f in dataclasses.fields(C.TreeConfig) if f.name == "w"]
    assert tree_w.metadata["at_least"] == 1
    with pytest.raises(
        ConfigError, match=r"sampling.temperature=0.0 is too small: set sampling.temperature >= 1e-06"
    ):
        load_config(None, ["sampling.temperature=0"])


def test_segment_alignment_is_one_rule():
    tree, gen = C.TreeConfig(l=40, align_segments_to_blocks=True), C.GeneratorConfig(block_size=32)
    C.check_segment_alignment(C.TreeConfig(l=64, align_segments_to_blocks=True), gen)
    with pytest.raises(ConfigError, match="tree.l=40 is not a multiple of generators.block_size=32"):
        C.check_segment_alignment(tree, gen)
    C.check_segment_alignment(C.TreeConfig(l=40, align_segments_to_blocks=True, mode="flat"), gen)
    C.check_segment_alignment(tree, C.GeneratorConfig(block_size=32, backend="hf"))
    C.check_segment_alignment(C.TreeConfig(l=40), gen)  # alignment off


def test_validate_checks_a_config_built_in_code():
    cfg = TrainConfig()
    cfg.learner.packing = "rows"
    with pytest.raises(ConfigError, match="learner.packing='rows' is not one of tree, flat, none"):
        C.validate(cfg)
    cfg = TrainConfig()
    cfg.reward.overlong_buffer = 200
    with pytest.raises(ConfigError, match="reward.overlong_buffer=200 > tree.max_response_tokens=128"):
        C.check_across_sections(cfg)


def test_a_mapping_on_the_command_line_replaces_the_presets():
    """``generators.ray_resources={}`` clears the 7B preset's pinning (merging kept generator_node);
    a mapping with keys replaces it; an override of another key leaves it as the preset set it."""
    preset = "configs/qwen2.5-7b-treepo.yaml"
    assert load_config(preset, ["generators.ray_resources={}"]).generators.ray_resources == {}
    cfg = load_config(preset, ["learner.ray_resources={gpu_a100: 1}"])
    assert cfg.learner.ray_resources == {"gpu_a100": 1}
    assert cfg.generators.ray_resources == {"generator_node": 1}
    assert load_config(preset, ["tree.w=16"]).learner.ray_resources == {"learner_node": 1}
