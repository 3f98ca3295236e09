"""Tree pictures: sampled segment trees as one self-contained HTML page (inline CSS, no script, no
external resource), so a run directory shows what the sampler grew and what training made of it.

Every segment is a node, drawn as an indented outline (children below their parent, joined by
lines), with its decoded text (observation tokens -- a tool's result, not sampled -- on a shaded
background, marked ``class="obs"``) and a header: node id, depth, tokens, the leaves below it, their mean
reward and mean advantage (the advantage its tokens are trained with, averaged over the leaves that
share it). A leaf adds its finish reason, reward, verdict, advantage and extracted answer. All text is
HTML-escaped.

:func:`render_page` returns the page; :func:`write_tree_page` writes it; :func:`pick_trees` chooses
the trees worth drawing (the most segments first). Pure: reads trees, writes nothing else.
"""

from __future__ import annotations

import html
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from common.tree import ROOT_ID

DecodeFn = Callable[[Sequence[int]], str]

_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.3em} h2{font-size:1.05em;margin:.2em 0}
section.tree{background:#fff;border:1px solid #ccc;border-radius:6px;padding:.8em 1em;margin:1.2em 0}
pre{white-space:pre-wrap;word-break:break-word;margin:.2em 0;font-size:.85em}
pre.prompt{background:#eef;padding:.4em;border-radius:4px}
ul.t,ul.t ul{list-style:none;margin:0;padding-left:1.4em;border-left:2px solid #bbb}
ul.t{border-left:none;padding-left:0}
li{margin:.35em 0;position:relative}
ul.t ul>li:before{content:"";position:absolute;left:-1.4em;top:.9em;width:1.2em;border-top:2px solid #bbb}
div.seg{border:1px solid #ddd;border-radius:4px;padding:.25em .5em;background:#fdfdfd;max-width:60em}
div.meta{font-size:.75em;color:#555}
div.leaf{font-size:.8em;margin-top:.2em;padding:.15em .4em;border-radius:3px}
div.leaf.ok{background:#d9f2d9} div.leaf.bad{background:#f7dada} div.leaf.none{background:#eee}
span.pos{color:#17692b} span.neg{color:#a11}
p.legend{font-size:.85em;color:#444}
span.obs{background:#fff1c2;border-bottom:1px dashed #b8860b}
"""

_LEGEND = (
    "Each box is one segment (decoded once, shared by the leaves below it). Header: node id, depth, "
    "tokens, leaves below, their mean reward R&#772; and mean advantage A&#772;. A leaf's line: finish "
    "reason, reward R, verdict, advantage A (as trained), extracted answer. "
    '<span class="obs">Shaded text</span> is a tool\'s observation: read by the model, not sampled, '
    "not trained on."
)


def _fmt(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "n/a"
    cls = "pos" if x > 0 else "neg" if x < 0 else ""
    return f'<span class="{cls}">{x:+.3f}</span>'


def _num(x: Any) -> float | None:
    return None if x is None or not math.isfinite(float(x)) else float(x)


def leaf_records(tree: Any, advantages_L: Sequence[float] | None) -> list[dict[str, Any]]:
    """Per leaf (``tree.leaves`` order): finish reason, reward, verdict, advantage, answer, tokens."""
    if advantages_L is not None and len(advantages_L) != len(tree.leaves):
        raise ValueError(f"tree {tree.tree_id}: {len(advantages_L)} advantages for {len(tree.leaves)} leaves")
    return [
        {
            "finish_reason": lf.finish_reason,
            "reward": _num(lf.reward),
            "correct": lf.correct,
            "advantage": None if advantages_L is None else _num(advantages_L[i]),
            "answer": lf.answer,
            "tokens": int(lf.length),
        }
        for i, lf in enumerate(tree.leaves)
    ]


def _mean(xs: list[float | None]) -> float | None:
    vals = [x for x in xs if x is not None and math.isfinite(x)]
    return sum(vals) / len(vals) if vals else None


def text_parts(segment: Any, decode: DecodeFn) -> list[tuple[str, bool]]:
    """A segment's text as (decoded text, is observation) runs, in order (one run without observations)."""
    ids, obs = segment.token_ids.tolist(), segment.observed_mask().tolist()
    parts: list[tuple[str, bool]] = []
    start = 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or obs[i] != obs[start]:
            parts.append((decode(ids[start:i]), bool(obs[start])))
            start = i
    return parts or [(decode([]), False)]


def segment_nodes(tree: Any, advantages_L: Sequence[float] | None, decode: DecodeFn) -> dict[str, Any]:
    """The tree as nested nodes for drawing: ``{"leaves": [leaf record], "children": {parent: [node]}}``,
    each node ``{"id", "depth", "text", "parts", "tokens", "observed", "leaves": [leaf record],
    "below": [leaf index], "mean_reward", "mean_advantage"}`` (:func:`leaf_records`; ``parts``:
    :func:`text_parts`, ``observed``: its observation tokens)."""
    leaf_recs = leaf_records(tree, advantages_L)
    below: dict[int, list[int]] = {s.node_id: [] for s in tree.segments}
    for i, path in enumerate(tree.leaf_paths()):
        for nid in path:
            below[nid].append(i)
    children: dict[int, list[dict]] = {}
    for s in sorted(tree.segments, key=lambda s: s.node_id):
        idx = below[s.node_id]
        children.setdefault(s.parent_id, []).append(
            {
                "id": s.node_id,
                "depth": s.depth,
                "text": decode(s.token_ids.tolist()),
                "parts": text_parts(s, decode),
                "tokens": len(s.token_ids),
                "observed": s.num_observed,
                "leaves": [leaf_recs[i] for i, lf in enumerate(tree.leaves) if lf.node_id == s.node_id],
                "below": idx,
                "mean_reward": _mean([leaf_recs[i]["reward"] for i in idx]),
                "mean_advantage": _mean([leaf_recs[i]["advantage"] for i in idx]),
            }
        )
    return {"leaves": leaf_recs, "children": children}


def _leaf_html(rec: dict, index: int) -> str:
    verdict = {True: ("ok", "correct"), False: ("bad", "wrong")}.get(rec["correct"], ("none", "unscored"))
    answer = "none" if rec["answer"] is None else html.escape(str(rec["answer"]))
    return (
        f'<div class="leaf {verdict[0]}" data-leaf="{index}">leaf {index} · '
        f"{html.escape(rec['finish_reason'])} · R {_fmt(rec['reward'])} · {verdict[1]} · "
        f"A {_fmt(rec['advantage'])} · answer <code>{answer}</code> · {rec['tokens']} tokens</div>"
    )


def _node_html(node: dict, children: dict[int, list[dict]], leaf_index: dict[int, int]) -> str:
    obs = f" ({node['observed']} observed)" if node["observed"] else ""
    meta = (
        f"#{node['id']} · depth {node['depth']} · {node['tokens']} tok{obs} · {len(node['below'])} leaves"
        f" below · R&#772; {_fmt(node['mean_reward'])} · A&#772; {_fmt(node['mean_advantage'])}"
    )
    text = "".join(
        f'<span class="obs">{html.escape(t)}</span>' if observed else html.escape(t)
        for t, observed in node["parts"]
    )
    leaves = "".join(_leaf_html(rec, leaf_index[id(rec)]) for rec in node["leaves"])
    kids = children.get(node["id"], [])
    sub = "<ul>" + "".join(_node_html(k, children, leaf_index) for k in kids) + "</ul>" if kids else ""
    return (
        f'<li><div class="seg" data-node="{node["id"]}" data-depth="{node["depth"]}">'
        f'<div class="meta">{meta}</div><pre>{text}</pre>{leaves}</div>{sub}</li>'
    )


def render_tree(tree: Any, advantages_L: Sequence[float] | None, decode: DecodeFn) -> str:
    """One ``<section class="tree">``: header, prompt, then the segments from the root down."""
    view = segment_nodes(tree, advantages_L, decode)
    leaf_recs, children = view["leaves"], view["children"]
    leaf_index = {id(r): i for i, r in enumerate(leaf_recs)}
    flat = sum(tree.sampled_length(lf) for lf in tree.leaves)  # decoded tokens: observations are not
    ratio = f"{tree.num_tokens() / flat:.2f}" if flat else "n/a"
    tools = tree.num_observation_tokens()
    depth = {s.node_id: s.depth for s in tree.segments}
    depths = [depth[lf.node_id] for lf in tree.leaves]
    head = (
        f"{html.escape(tree.tree_id)} · gold <code>{html.escape(str(tree.metadata.get('answer')))}</code> · "
        f"{len(tree.leaves)} leaves · {len(tree.segments)} segments · mean leaf depth "
        f"{sum(depths) / max(len(depths), 1):.2f} · decoded/flat tokens {ratio}"
        + (f" · {tools} observation tokens" if tools else "")
    )
    roots = "".join(_node_html(n, children, leaf_index) for n in children.get(ROOT_ID, []))
    return (
        f'<section class="tree" data-tree="{html.escape(tree.tree_id, quote=True)}"><h2>{head}</h2>'
        f'<pre class="prompt">{html.escape(decode(tree.prompt_ids.tolist()))}</pre><ul class="t">{roots}</ul></section>'
    )


def render_page(
    trees: Sequence[Any],
    advantages: Sequence[Sequence[float] | None] | None,
    decode: DecodeFn,
    title: str,
) -> str:
    """A self-contained HTML page of ``trees``; ``advantages``: per tree, one per leaf, or None."""
    advs = list(advantages) if advantages is not None else [None] * len(trees)
    if len(advs) != len(trees):
        raise ValueError(f"{len(advs)} advantage lists for {len(trees)} trees")
    body = "".join(render_tree(t, a, decode) for t, a in zip(trees, advs))
    return (
        '<!doctype html><html><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
        f'<h1>{html.escape(title)}</h1><p class="legend">{_LEGEND}</p>{body}</body></html>\n'
    )


def pick_trees(trees: Sequence[Any], n: int) -> list[int]:
    """Indices of up to ``n`` trees to draw: the most segments first (the most branching), ties by order."""
    order = sorted(range(len(trees)), key=lambda i: (-len(trees[i].segments), i))
    return sorted(order[: max(n, 0)])


def write_tree_page(
    path: str | os.PathLike,
    trees: Sequence[Any],
    advantages: Sequence[Sequence[float] | None] | None,
    decode: DecodeFn,
    title: str,
    n: int | None = None,
) -> Path:
    """Write :func:`render_page` of ``trees`` (the ``n`` picked by :func:`pick_trees`; None = all) to
    ``path`` (parents created) and return it."""
    idx = list(range(len(trees))) if n is None else pick_trees(trees, n)
    advs = None if advantages is None else [advantages[i] for i in idx]
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_page([trees[i] for i in idx], advs, decode, title), encoding="utf-8")
    return out


def write_step_pictures(
    run_dir: str | os.PathLike,
    step: int,
    trees: Sequence[Any],
    advantages: Sequence[Sequence[float] | None] | None,
    decode: DecodeFn,
    n: int,
) -> Path | None:
    """A training step's page, ``<run_dir>/trees/step-<step>.html``, of ``n`` of its trees (0 = none)."""
    if n <= 0 or not trees:
        return None
    path = Path(run_dir) / "trees" / f"step-{step:06d}.html"
    return write_tree_page(path, trees, advantages, decode, f"step {step}: trained trees", n=n)
