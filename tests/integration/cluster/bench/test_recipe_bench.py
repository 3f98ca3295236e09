"""``treepo bench recipe`` end to end, tiny: TreePO and GRPO arms x 2 seeds x 2 steps on the random
tiny model, each a real ``treepo train`` process (local driver, vLLM CPU engine). Checks the JSON's
structure and consistency with the runs' metrics, the plots, the arms' sampling (flat GRPO decodes
every leaf in full: decoded/flat tokens 1; TreePO's trees share prefixes), and the tree pictures."""

from __future__ import annotations

import json

import pytest

from cluster import cli

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_recipe_runs_both_arms_over_seeds_and_writes_json_and_plots(tiny_model_dir, tmp_path):
    from cluster.bench import recipe

    out = tmp_path / "recipe"
    args = cli.build_parser().parse_args(
        ["bench", "recipe", "--seeds", "2", "--out-dir", str(out), "--json", str(tmp_path / "summary.json")]
        + ["learner.total_steps=2", "eval.every_steps=2", "eval.max_problems=2", "eval.k=1"]
        + [f"model.path={tiny_model_dir}", "generators.kv_cache_gib=0.25", "generators.trees_in_flight=4"]
        + ["tree.w=4", "tree.d=2", "tree.l=32", "tree.max_response_tokens=64", "learner.prompts_per_step=2"]
        + ["learner.mini_batch_prompts=2", "algo.dynamic_sampling=false", "data.synthetic_train_size=8"]
    )
    assert recipe.run(args) == 0
    report = json.loads((out / "recipe.json").read_text())
    assert json.loads((tmp_path / "summary.json").read_text()) == report["summary"]
    ratios: dict[str, list[float]] = {"treepo": [], "grpo": []}
    for arm in ("treepo", "grpo"):
        assert sorted(report["curves"][arm]) == ["0", "1"]
        for seed, c in report["curves"][arm].items():
            assert c["step"] == [0.0, 2.0] and len(c["accuracy"]) == 2
            assert c["tokens"][0] == 0.0 < c["tokens"][1] and c["wall"][0] == 0.0 < c["wall"][1]
            rows = [
                json.loads(x) for x in (out / f"{arm}-seed{seed}" / "metrics.jsonl").read_text().splitlines()
            ]
            assert c["tokens"][1] == rows[-1]["rollout/decoded_tokens"]
            ratio = [r["tree/decoded_vs_flat"] for r in rows if "tree/decoded_vs_flat" in r]
            assert len(ratio) == 2 and all(0 < x <= 1.0 for x in ratio)
            ratios[arm] += ratio
            # the eval step's tree pictures hold every leaf of the trees they draw (2 trees x 4 leaves)
            page = (out / f"{arm}-seed{seed}" / "trees" / "step-000002.html").read_text()
            assert page.count('<section class="tree"') == 2 and page.count('data-leaf="') == 8
        s = report["summary"][arm]
        assert (
            s["seeds"] == 2 and s["final_accuracy_min"] <= s["final_accuracy_mean"] <= s["final_accuracy_max"]
        )
    assert set(ratios["grpo"]) == {1.0} and min(ratios["treepo"]) < 1.0  # flat decodes every leaf in full
    r = report["summary"]["treepo_over_grpo"]
    assert r["decoded_tokens"] == pytest.approx(
        report["summary"]["treepo"]["decoded_tokens_mean"] / report["summary"]["grpo"]["decoded_tokens_mean"]
    )
    for name in ("acc_vs_step.png", "acc_vs_tokens.png", "acc_vs_wall.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
