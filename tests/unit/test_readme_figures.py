"""scripts/readme_figures.py prints the README's TreePO-vs-GRPO block from the recipe runs it finds
(``--reuse``): ranges over builds of the per-build means, the ratios, the commit and machine line."""

from __future__ import annotations

import json
import subprocess
import sys

from paths import REPO


def _recipe(out, seed_shift: float) -> None:
    """One build's ``treepo bench recipe`` output: recipe.json and each run's metrics.jsonl."""
    summary = {
        "treepo": {
            "first_accuracy_mean": 0.5,
            "final_accuracy_mean": 0.8 + seed_shift,
            "final_accuracy_min": 0.78,
            "final_accuracy_max": 0.9 + seed_shift,
            "decoded_tokens_mean": 600.0,
            "wall_s_mean": 9.0,
        },
        "grpo": {
            "first_accuracy_mean": 0.5,
            "final_accuracy_mean": 0.7,
            "final_accuracy_min": 0.65,
            "final_accuracy_max": 0.75,
            "decoded_tokens_mean": 1000.0,
            "wall_s_mean": 10.0,
        },
    }
    summary["treepo_over_grpo"] = {
        "decoded_tokens": 0.6,
        "wall_s": 0.9,
        "final_accuracy_diff": 0.1 + seed_shift,
    }
    out.mkdir(parents=True)
    (out / "recipe.json").write_text(json.dumps({"seeds": 2, "summary": summary}))
    for arm, depth in (("treepo", 3.0), ("grpo", 1.0)):
        for seed in range(2):
            run = out / f"{arm}-seed{seed}"
            run.mkdir()
            rows = [
                {
                    "step": s,
                    "tree/leaf_depth_mean": depth - 0.1 * seed,
                    "tree/decoded_vs_flat": depth / 6 + 0.5,
                }
                for s in (1, 2)
            ]
            (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_the_recipe_block_holds_ranges_over_builds(tmp_path):
    _recipe(tmp_path / "recipe-s0", 0.0)
    _recipe(tmp_path / "recipe-s1", 0.05)
    out = subprocess.run(
        [
            sys.executable,
            "scripts/readme_figures.py",
            "--only",
            "recipe",
            "--builds",
            "0,1",
            "--reuse",
            "--out",
            str(tmp_path),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "<!-- figures:recipe ·" in text and "cores" in text
    assert "treepo bench recipe --seeds 3 learner.total_steps=12" in text
    treepo = next(line for line in text.splitlines() if line.startswith("| treepo"))
    assert "0.50 → 0.80–0.85" in treepo and "(0.60× GRPO)" in treepo and "(0.90× GRPO)" in treepo
    assert "| 2.90–3.00 |" in treepo, treepo  # mean leaf depth: the lowest and highest seed's mean
    assert "per build [0, 1]: +0.100, +0.150" in text


def test_bad_arguments_are_refused_with_the_choices(tmp_path):
    out = subprocess.run(
        [sys.executable, "scripts/readme_figures.py", "--only", "plots", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "choose among demo, recipe, long" in out.stderr


def test_the_long_block_holds_the_ratios_and_where_a_step_goes(tmp_path):
    out = tmp_path / "long"
    arm = {
        "first_accuracy_mean": 0.4,
        "final_accuracy_mean": 0.9,
        "final_accuracy_min": 0.88,
        "final_accuracy_max": 0.93,
        "decoded_tokens_mean": 500.0,
        "wall_s_mean": 60.0,
        "command_wall_s_mean": 100.0,
    }
    summary = {
        "treepo": arm,
        "grpo": {**arm, "decoded_tokens_mean": 1000.0, "wall_s_mean": 100.0, "command_wall_s_mean": 150.0},
        "treepo_over_grpo": {
            "decoded_tokens": 0.5,
            "wall_s": 0.6,
            "command_wall_s": 0.667,
            "final_accuracy_diff": 0,
        },
    }
    out.mkdir()
    (out / "recipe.json").write_text(json.dumps({"seeds": 1, "summary": summary}))
    for name, gen in (("treepo", 1.0), ("grpo", 3.0)):
        (out / f"{name}-seed0").mkdir()
        row = {"step": 1, "timing/step_s": gen + 1, "timing/generate_s": gen, "timing/train_s": 0.75}
        row["tree/decoded_vs_flat"] = 0.5 if name == "treepo" else 1.0
        (out / f"{name}-seed0" / "metrics.jsonl").write_text(json.dumps(row) + "\n")
    cmd = [sys.executable, "scripts/readme_figures.py", "--only", "long", "--reuse", "--out", str(tmp_path)]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "treepo bench recipe --config configs/long.yaml --seeds 3 driver=ray" in res.stdout
    treepo = next(line for line in res.stdout.splitlines() if line.startswith("| treepo"))
    grpo = next(line for line in res.stdout.splitlines() if line.startswith("| grpo"))
    assert (
        "0.40 → 0.90 (0.88–0.93)" in treepo and "500 (0.50× GRPO)" in treepo and "60.0 (0.60× GRPO)" in treepo
    )
    assert "100.0 (0.67× GRPO)" in treepo and "| 0.50 | 1.00 · 0.75 · 0.00 |" in treepo, treepo
    assert "| 1.00 | 3.00 · 0.75 · 0.00 |" in grpo, grpo
