"""Every metric key a training run writes to ``metrics.jsonl`` (and the trackers), with its meaning.

``docs/metrics.md`` is generated from :data:`NAMESPACES` and :data:`METRICS`
(``python scripts/gen_docs.py``); a test fails when a key written by a run, or named in the source,
is missing here. A ``<name>`` part of a key stands for a value (a depth, a finish reason, ``k``).
"""

from __future__ import annotations

import functools
import re

NAMESPACES: dict[str, str] = {
    "": "Every row.",
    "rollout/": "What was sampled and trained on this step; the engine's work (cumulative since start).",
    "tree/": "Shape of the trees sampled this step (TreePO's segment trees; flat groups count as depth 1).",
    "learner/": "The learner's optimizer steps of this controller step (means over micro-batches/ranks).",
    "staleness/": "How many policy versions the trained leaves lag the learner (bounded by algo.max_staleness).",
    "sync/": "The last weight broadcast from learner rank 0 to the engines.",
    "timing/": "Wall-clock seconds of the step's phases (controller side).",
    "generator/": "Generator actors' counters, combined over generators (driver=ray).",
    "pipeline/": "The asynchronous pipeline's cumulative counters (driver=ray).",
    "queue/": "The replay queue in Redis (driver=ray).",
    "reward/": "Reward function calls (local driver: cumulative; failures: this step, both drivers).",
    "eval/": "Held-out evaluation every eval.every_steps (flat sampling, eval.k answers per problem); "
    "driver=ray runs it beside training and logs it as a row of its own at the step it evaluated.",
}

METRICS: dict[str, str] = {
    "step": "Controller step (one row per step; prompts_per_step prompts trained).",
    "time": "Unix time the row was written.",
    # rollout/
    "rollout/reward": "Mean reward over every leaf sampled this step, before any filter.",
    "rollout/accuracy": "Share of leaves sampled this step whose answer was judged correct.",
    "rollout/trained_reward": "Mean reward of the leaves trained on (after dynamic sampling).",
    "rollout/response_len": "Mean response length in tokens of the leaves trained on.",
    "rollout/trees_sampled": "Trees taken from the queue this step (kept and dropped).",
    "rollout/trees_dropped_uniform": "Trees dropped by dynamic sampling (all leaves equally rewarded).",
    "rollout/segment_version_min": "Oldest policy version a trained segment was sampled under.",
    "rollout/segment_version_max": "Newest policy version a trained segment was sampled under.",
    "rollout/steps": "Engine calls (or engine steps of the request stream) so far.",
    "rollout/requests": "Segment requests sent to the engine so far.",
    "rollout/max_batch": "Largest number of requests in one engine call.",
    "rollout/decoded_tokens": "Tokens the engine decoded so far (shared prefixes once).",
    "rollout/prefill_tokens_computed": "Prompt/prefix tokens the engine computed (prefix-cache misses).",
    "rollout/prefill_tokens_cached": "Prompt/prefix tokens served from the engine's prefix cache.",
    "rollout/prefix_cache_hit_rate": "prefill_tokens_cached / all prefill tokens.",
    "rollout/backend_s": "Seconds spent inside engine calls.",
    "rollout/trajectories_per_s": "Leaves finished per second of engine time (summed over generators).",
    "rollout/tokens_per_s": "Leaf tokens (each leaf counted in full) per second of engine time.",
    "rollout/decoded_tokens_per_s": "Decoded tokens per second of engine time.",
    # tree/
    "tree/trees": "Trees sampled this step.",
    "tree/leaves": "Leaves (trajectories) of those trees.",
    "tree/leaves_per_tree": "Mean leaves per tree (tree.w unless a tree was cut short).",
    "tree/leaf_depth_mean": "Mean depth (segments) of a leaf.",
    "tree/leaf_depth/<depth>": "Leaves that ended at this depth.",
    "tree/branching/<depth>": "Mean children per branching node at this depth.",
    "tree/finish/<reason>": "Leaves by how they ended (eos, answered, length, repetition, ...).",
    "tree/fallbacks": "Trees with no live path re-seeded from a kept prefix (tree.fallback).",
    "tree/restarts": "Fallbacks with no candidate prefix: re-seeded from the root.",
    "tree/leaf_tokens": "Response tokens over all leaves, shared prefixes counted per leaf.",
    "tree/distinct_tokens": "Response tokens actually decoded for the trees (shared prefixes once).",
    "tree/decoded_vs_flat": "distinct_tokens / leaf_tokens: the decode cost against flat sampling.",
    "tree/decoded_per_leaf": "Decoded tokens per leaf.",
    "tree/flat_per_leaf": "Response tokens per leaf (what flat sampling decodes).",
    "tree/tool_calls": "Tool calls run for the trees (with tools).",
    "tree/tool_errors": "Tool calls answered 'error: ...' (a failing tool, a bad call, the per-response limit).",
    "tree/tool_calls_per_leaf": "Tool calls on a leaf's path, averaged over leaves.",
    "tree/observation_tokens": "Tool-result tokens stored in the trees (not decoded; masked from the loss).",
    "tree/tool_branching": "Mean children of a node that ends in a tool call: the branching at tool boundaries.",
    # learner/
    "learner/loss": "Total loss (policy gradient plus any KL term).",
    "learner/pg_loss": "Policy-gradient (clipped surrogate) loss.",
    "learner/entropy": "Mean token entropy of the policy on the trained tokens (collapse watch).",
    "learner/grad_norm": "Gradient norm before clipping (learner.grad_clip).",
    "learner/lr": "Learning rate after the schedule.",
    "learner/tokens": "Response tokens in the loss this step.",
    "learner/forward_tokens": "Packed tokens through the model (prompt and shared segments once).",
    "learner/clip_frac_low": "Share of tokens with a negative advantage and a ratio below 1 - algo.clip_low.",
    "learner/clip_frac_high": "Share of tokens with a positive advantage and a ratio above 1 + algo.clip_high.",
    "learner/clip_frac_dual": "Share of tokens with a negative advantage and a ratio above algo.dual_clip.",
    "learner/ratio_mean": "Mean ratio of the learner's to the behaviour probability.",
    "learner/is_weight_mean": "Mean truncated importance weight (algo.is_correction).",
    "learner/is_weight_min": "Smallest truncated importance weight.",
    "learner/is_weight_max": "Largest truncated importance weight (at most algo.is_cap).",
    "learner/is_raw_max": "Largest importance weight before truncation.",
    "learner/is_truncated_frac": "Share of tokens whose raw importance weight is outside [1/algo.is_cap, algo.is_cap].",
    "learner/mismatch_kl_k1": "k1 estimate of KL(sampler || learner) on the sampled tokens.",
    "learner/mismatch_kl_k3": "k3 estimate of KL(sampler || learner); a jump points at a broken weight sync.",
    "learner/ref_kl_k3": "k3 estimate of KL to the reference model (only with algo.kl_coef > 0).",
    "learner/skipped_steps": "Optimizer steps skipped for a non-finite gradient, so far.",
    "learner/version": "Policy version (optimizer steps taken) after this step.",
    "learner/idle_frac": "Share of the run's wall time the learner waited for trees (driver=ray).",
    # staleness/
    "staleness/mean": "Mean versions behind of the trained leaves (newest segment).",
    "staleness/max": "Most versions behind of a trained leaf.",
    "staleness/token_mean": "Mean versions behind per trained token.",
    "staleness/token_max": "Most versions behind of a trained token.",
    "staleness/trees_dropped": "Trees dropped this step as older than algo.max_staleness (prompts re-issued).",
    "staleness/hist/<versions>": "Leaves trained so far that were this many versions behind.",
    # sync/
    "sync/bytes": "Bytes broadcast in the last weight sync.",
    "sync/seconds": "Seconds of the last weight sync.",
    "sync/gbps": "GB/s of the last weight sync.",
    "sync/buckets": "Buckets the last weight sync was sent in.",
    # timing/
    "timing/step_s": "Seconds of the whole step.",
    "timing/generate_s": "Seconds waiting for (driver=ray) or sampling (local) the step's trees.",
    "timing/train_s": "Seconds of the learner's train step.",
    "timing/sync_s": "Seconds of the weight sync to the engines.",
    "timing/checkpoint_s": "Seconds writing the checkpoint (driver=ray; 0 when none was due).",
    "timing/eval_s": "Seconds the held-out evaluation took beside training (driver=ray; in no step's time).",
    # generator/
    "generator/pushed": "Trees the generators pushed to the queue so far.",
    "generator/refused": "Finished trees the queue refused (a prompt re-issued elsewhere: no duplicate).",
    "generator/steps": "Sampler steps of the generators so far.",
    "generator/updates": "Weight updates the generators applied so far.",
    "generator/busy_s": "Seconds the generators spent sampling.",
    "generator/idle_s": "Seconds the generators waited (admission full, no prompt).",
    "generator/sync_s": "Seconds the generators spent applying weight updates.",
    "generator/receive_s": "Seconds the generators spent receiving weights.",
    "generator/wall_s": "Seconds since the generators started.",
    "generator/idle_frac": "Mean share of a generator's time spent idle.",
    "generator/version": "Mean policy version the generators sample under.",
    "generator/weights_step": "Mean controller step at which the generators' weights were published.",
    "generator/in_flight": "Trees growing in the generators now.",
    # pipeline/
    "pipeline/trees_per_s": "Trees consumed per second since the run started.",
    "pipeline/dropped_total": "Trees dropped so far (stale and dynamic sampling).",
    "pipeline/duplicates": "Trees consumed twice and skipped (exactly-once training).",
    "pipeline/reissued_stale": "Prompts re-issued this step because their tree was stale.",
    "pipeline/quarantined": "Queue entries moved to the dead-letter stream so far (poison entries).",
    "pipeline/generator_restarts": "Generator actors restarted so far.",
    "pipeline/sync_failures": "Weight-sync attempts that failed so far (the group is rebuilt and the sync tried again).",
    "pipeline/loop_failures": "Generator loops that ended with an error so far.",
    "pipeline/hangs": "Generators restarted for a silent loop (generators.hang_timeout_s) so far.",
    "pipeline/orphans": "Entries delivered but never acknowledged, taken back so far.",
    # queue/
    "queue/depth": "Trees waiting in the queue.",
    "queue/undelivered": "Entries not yet read by the controller.",
    "queue/dead_count": "Entries in the dead-letter stream.",
    # reward/
    "reward/calls": "Reward calls so far (local driver).",
    "reward/errors": "Reward calls that raised so far (local driver).",
    "reward/timeouts": "Reward calls past reward.timeout_s so far (local driver).",
    "reward/in_process": "Reward calls run in the calling process so far (local driver).",
    "reward/seconds": "Seconds spent in reward calls so far (local driver).",
    "reward/failed_calls": "Reward calls that failed this step (scored wrong).",
    "reward/failed_share": "failed_calls / calls this step; the run stops past reward.max_error_share.",
    # eval/
    "eval/accuracy": "mean@k on the held-out set (share of correct answers).",
    "eval/answered": "Share of answers that give a final \\boxed{} answer at all.",
    "eval/mean@<k>": "Share of correct answers per problem, averaged.",
    "eval/pass@<k>": "Unbiased pass@k.",
    "eval/maj@<k>": "Majority-vote accuracy (bootstrap over the k answers).",
    "eval/version": "Policy version the evaluation ran under (driver=ray).",
}


@functools.cache
def _pattern(key: str) -> re.Pattern[str]:
    parts = re.split(r"(<[a-z_]+>)", key)
    return re.compile("".join("[^/]+" if p.startswith("<") else re.escape(p) for p in parts) + "$")


def documented_as(key: str) -> str | None:
    """The registry entry that documents ``key`` (``tree/leaf_depth/3`` -> ``tree/leaf_depth/<depth>``)."""
    return next((k for k in METRICS if _pattern(k).match(key)), None)


def undocumented(keys: list[str] | set[str]) -> list[str]:
    """The keys, of those given, that no registry entry documents (sorted)."""
    return sorted(k for k in keys if documented_as(k) is None)


def namespace(key: str) -> str:
    return key.split("/", 1)[0] + "/" if "/" in key else ""
