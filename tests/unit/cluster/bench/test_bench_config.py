"""Every benchmark takes a run's config: ``--config PRESET`` and ``key=value`` overrides through the
config's own loader, so a bad key is refused with the config's one-line error before anything starts,
and the keys reach the measurement (the JSON echoes the config used)."""

from __future__ import annotations

import json

import pytest

from cluster.bench import learner, pipeline, recipe, sampling
from cluster.cli import build_parser, main
from cluster.commands.bench import BENCHES
from common.config import load_config
from common.errors import ConfigError


def _config_error(overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    return str(e.value)


def _args(*argv: str):
    return build_parser().parse_args(["bench", *argv])


@pytest.mark.parametrize("bench", list(BENCHES))
@pytest.mark.parametrize("override", ["tree.l=0", "no.such.key=1"])
def test_every_bench_refuses_a_bad_key_with_the_configs_error(bench, override, capsys, tmp_path):
    argv = ["bench", bench, override, *(["--out-dir", str(tmp_path / "out")] if bench == "recipe" else [])]
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err == [f"treepo bench: error: {_config_error([override])}"]
    assert not (tmp_path / "out").exists()


def test_the_segment_rule_of_the_config_holds_for_both_sampling_modes(capsys):
    """tree.l not a multiple of the KV block with aligned segments: refused by the config's own rule,
    also when the config's mode is flat (the bench runs a tree too)."""
    want = _config_error([*sampling.DEFAULTS, "tree.l=80"])
    assert "tree.l=80" in want and "generators.block_size=32" in want
    for extra in ([], ["tree.mode=flat"]):
        assert main(["bench", "sampling", "tree.l=80", *extra]) == 2
        assert capsys.readouterr().err.strip() == f"treepo bench: error: {want}"


def test_sampling_keys_reach_the_measurement_and_the_json(monkeypatch, tmp_path, capsys):
    seen = {}
    keys = ["wall_s", "rollout/decoded_tokens", "rollout/trajectories_per_s", "rollout/tokens_per_s"]
    keys += ["rollout/prefill_tokens_computed", "rollout/prefill_tokens_cached", "rollout/steps"]
    keys += ["engine/steps", "engine/occupancy"]
    walls = {"flat": 4.0, "level": 3.0, "barrier_free": 2.0}

    def measure(args, cfg, model, shapes):
        seen.update(cfg=cfg, model=model, shapes=shapes)
        per_shape = [{m: {k: wall for k in keys} for m, wall in walls.items()} for _ in shapes]
        return per_shape, 32, [("p0", [1] * 10)]

    monkeypatch.setattr(sampling, "_measure", measure)
    monkeypatch.setattr(sampling, "resolve_model", lambda m: f"/models/{m.tiny_size}")
    out = tmp_path / "r.json"
    args = _args("sampling", "--json", str(out), "tree.w=4", "tree.d=2", "tree.l=32", "tree.b=4")
    args.overrides += ["tree.max_response_tokens=64", "model.tiny_size=xs", "sampling.temperature=0.5"]
    assert sampling.run(args) == 0
    cfg = seen["cfg"]
    assert (cfg.tree.w, cfg.tree.d, cfg.tree.l, cfg.tree.b, cfg.tree.max_response_tokens) == (4, 2, 32, 4, 64)
    assert cfg.sampling.temperature == 0.5 and cfg.tree.repetition_check is False  # the bench's default
    assert seen["model"] == "/models/xs"
    # the default shapes, then the config's own
    assert [(t.d, t.l, t.max_response_tokens, t.w) for t in seen["shapes"]] == [
        (4, 64, 256, 4),
        (7, 32, 224, 4),
        (2, 32, 64, 4),
    ]
    report = json.loads(out.read_text())
    c = report["config"]
    assert (c["w"], c["d"], c["l"], c["b"], c["max_response_tokens"]) == (4, 2, 32, 4, 64)
    assert c["model"] == "tiny:arith xs (random init)" and c["preset"] is None
    assert c["overrides"][: len(sampling.DEFAULTS)] == sampling.DEFAULTS
    assert c["overrides"][-3:] == [
        "tree.max_response_tokens=64",
        "model.tiny_size=xs",
        "sampling.temperature=0.5",
    ]
    assert c["shapes"] == ["4x64", "7x32", "2x32"]
    last = report["shapes"][-1]
    assert last["barrier_free"]["engine/occupancy"] == 2.0
    # one prompt of 10 tokens, w=4 b=4 r=2, aligned to 32-token blocks: the first segment is stretched
    # to 55 tokens (10 + 55 - 1 = 64), the second has the 9 left of Lmax 64
    assert last["analytic_decoded_tokens"] == {"tree": 2 * 55 + 4 * 9, "flat": 4 * 64}
    rr = last["ratios"]
    assert rr["wall_barrier_free_over_flat"] == 0.5 and rr["wall_barrier_free_over_level"] == pytest.approx(
        2 / 3
    )
    assert rr["saving_realised_barrier_free"] == pytest.approx(0.5 / (1 - 146 / 256))
    text = capsys.readouterr().out
    assert "barrier-free" in text and "saving realised" in text


def test_the_bench_shapes_are_checked():
    with pytest.raises(ConfigError, match="DxL"):
        sampling.parse_shapes("4x64,7by32")
    assert sampling.parse_shapes("none") == []
    cfg = sampling.load_bench_config(_args("sampling"))
    assert [(t.d, t.l) for t in sampling.bench_shapes(cfg, "none")] == [(4, 64)]  # the config's own
    assert [(t.d, t.l) for t in sampling.bench_shapes(cfg, "4x64,7x32")] == [(4, 64), (7, 32)]
    with pytest.raises(ConfigError, match="tree.l=48"):  # aligned segments: a multiple of the block
        sampling.bench_shapes(cfg, "4x48")


def test_a_preset_replaces_the_benchs_own_defaults():
    cfg = sampling.load_bench_config(_args("sampling", "--config", "demo"))
    demo = load_config("demo")
    assert (cfg.tree.l, cfg.tree.w, cfg.model.path) == (demo.tree.l, demo.tree.w, demo.model.path)
    cfg = sampling.load_bench_config(_args("sampling", "--config", "demo", "tree.w=4"))
    assert cfg.tree.w == 4


def test_learner_recipe_and_pipeline_take_their_keys():
    args = _args(
        "learner",
        "--compare",
        "ranks",
        "tree.w=4",
        "learner.prompts_per_step=4",
        "learner.mini_batch_prompts=4",
    )
    cfg = learner.load_bench_config(args)
    assert (cfg.tree.w, cfg.learner.prompts_per_step, cfg.model.tiny_warmup_steps) == (4, 4, 0)
    with pytest.raises(ConfigError, match="learner.gpus_per_worker=0"):
        learner.load_bench_config(_args("learner", "--compare", "ranks", "learner.gpus_per_worker=1"))

    args = _args("recipe", "learner.total_steps=2", "eval.every_steps=2", "tree.w=4")
    base = recipe.load_args_config(args, recipe.DEFAULTS)
    assert (base.learner.total_steps, base.eval.every_steps, base.eval.max_problems) == (2, 2, 64)
    ov = recipe.run_overrides(args, "grpo", 1, base.learner.total_steps)
    assert ov.index("tree.w=4") < ov.index("tree.mode=flat")  # the arm wins over the user's keys
    assert "checkpoint.every_steps=2" in ov and "seed=1" in ov
    with pytest.raises(SystemExit, match="eval.every_steps"):
        recipe.run(_args("recipe", "eval.every_steps=0"))

    args = _args("pipeline", "learner.total_steps=2")
    assert pipeline.run(args) == 2  # one warm-up step and two measured need 3


def test_sampling_rounds_take_the_modes_in_turn_and_keep_the_fastest(monkeypatch):
    order, walls = [], iter([5.0, 3.0, 2.0, 4.0, 2.5, 2.2])

    def run_mode(backend, tree_cfg, sampling, inputs, eos, prompts):
        order.append("flat" if tree_cfg.mode == "flat" else sampling.expansion)
        return {"wall_s": next(walls)}

    monkeypatch.setattr(sampling, "_run_mode", run_mode)
    cfg = sampling.load_bench_config(_args("sampling"))
    got = sampling._measure_shape(None, cfg.tree, cfg.sampling, None, [], [], repeats=2)
    assert order == ["flat", "level", "barrier_free"] * 2
    assert {m: r["wall_s"] for m, r in got.items()} == {"flat": 4.0, "level": 2.5, "barrier_free": 2.0}
    assert got["barrier_free"]["wall_s_rounds"] == [2.0, 2.2]
    with pytest.raises(ConfigError, match="--repeats"):
        sampling.run(_args("sampling", "--repeats", "0"))
