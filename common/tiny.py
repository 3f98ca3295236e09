"""Tiny Qwen2 models and tokenizers built offline, optionally warm-started on a synthetic task.

``tiny:<task>`` models make every part of the system runnable on a CPU box without hub access: a
character-level tokenizer over the task's alphabet, a randomly initialised Qwen2 (head_dim 64, a
head size the vLLM CPU build supports), and a short supervised warm-start on the task's train split
(loss on the response tokens only) so that RL starts from a policy that is right some of the time.
Directories are written in Hugging Face format (safetensors, config, tokenizer, generation config)
that both transformers and vLLM load, plus ``treepo_tiny.json`` saying how the model was built.

A build is written into a temporary sibling directory and renamed into place, so an interrupted
build never leaves a half model behind; ``resolve_tiny`` caches builds under $TREEPO_CACHE keyed by
everything that changes the result, with a file lock so concurrent resolvers build it once.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import random
import re
import shutil
import tempfile
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from common import tasks
from common.errors import ModelError

# Bump when the saved format or the build recipe changes: cached builds with another version are rebuilt.
TINY_VERSION = 3

PAD, EOS, BOS, UNK = "<|pad|>", "<|eos|>", "<|bos|>", "<|unk|>"
SPECIAL_TOKENS = (PAD, EOS, BOS, UNK)  # ids 0..3 in every tiny tokenizer

# "role: content\n" per message; the generation prompt opens the assistant turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
_CHAT_CHARS = "systemuserassistant: \n"

# head_dim is 64 in every size (hidden / heads): the vLLM CPU build supports it. The MLP is 2x hidden
# for "s" and "m": at hidden 256, a 1024-wide MLP made a CPU training step several times slower here.
SIZES: dict[str, dict] = {
    "xs": dict(
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
    ),
    "s": dict(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    "m": dict(
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
    ),
}

# Warm-start recipe, tuned by measurement on the "s" model (arith, 1-digit operands): at 300 steps
# batch 16 reached 15 % greedy / 9 % at T=1 and batch 24 reached 20 % / 18 % in one build but 13 % / 4 %
# in another (float reductions differ with thread scheduling; the outcome is that sensitive); lr 6e-3
# trained worse than 3e-3. 500 steps (the default) reached loss 0.06 and 28 % greedy / 24 % at T=1,
# safely inside the 10-40 % band RL needs. Cost: about 2 minutes on 2 idle cores, once (cached).
WARMUP_BATCH = 24
WARMUP_LR = 3e-3
WARMUP_TRAIN_ROWS = 20_000
PASS_RATE_PROBLEMS = 100
MAX_NEW_TOKENS = 128


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """The reversible byte -> printable character map of byte-level tokenizers (each byte one symbol)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def build_tokenizer(task: str | None = "arith") -> PreTrainedTokenizerFast:
    """A tokenizer with one token per character of ``task``'s alphabet, or one per byte if ``task`` is None.

    Special tokens first (``<|pad|>`` 0, ``<|eos|>`` 1, ``<|bos|>`` 2, ``<|unk|>`` 3); nothing is added
    automatically around encoded text (no BOS), so ``encode(a + b) == encode(a) + encode(b)``.
    """
    # Both kinds are byte-level BPE without merges: every byte is one token. The character vocabulary is
    # the byte-level symbols of the task's (ASCII) characters. This exact layout matters: transformers'
    # AutoTokenizer (and so vLLM) re-creates a "qwen2" model's tokenizer as Qwen2Tokenizer, with its own
    # regex split, NFC and byte-level pre-tokenizer, from tokenizer.json's vocab and merges. With
    # byte-level symbols and no merges that re-creation encodes exactly as built here (tested); a
    # plain character-level WordLevel model did not survive it (spaces and newlines were dropped).
    byte_symbol = _bytes_to_unicode()
    if task is None:
        symbols = list(byte_symbol.values())
    else:
        chars = sorted(set(tasks.task_vocabulary(task)) | set(_CHAT_CHARS))
        if any(ord(c) > 127 for c in chars):
            raise ModelError(f"task {task!r} uses non-ASCII characters: the character tokenizer needs ASCII")
        symbols = [byte_symbol[ord(c)] for c in chars]
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({sym: len(SPECIAL_TOKENS) + i for i, sym in enumerate(symbols)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        eos_token=EOS,
        bos_token=BOS,
        unk_token=UNK,
        chat_template=CHAT_TEMPLATE,
        model_max_length=2048,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------


def build_config(size: str, tokenizer: PreTrainedTokenizerFast) -> Qwen2Config:
    if size not in SIZES:
        raise ModelError(f"unknown tiny model size {size!r}: use one of {', '.join(SIZES)}")
    return Qwen2Config(
        vocab_size=len(tokenizer),
        max_position_embeddings=2048,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        torch_dtype="float32",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        use_sliding_window=False,
        **SIZES[size],
    )


def _encode_rows(tokenizer, rows: list[dict]) -> list[tuple[list[int], int]]:
    """(prompt + solution + EOS ids, prompt length) per row."""
    out = []
    for r in rows:
        p = tokenizer.encode(r["prompt"], add_special_tokens=False)
        s = tokenizer.encode(r["solution"], add_special_tokens=False)
        out.append((p + s + [tokenizer.eos_token_id], len(p)))
    return out


def _collate(
    batch: list[tuple[list[int], int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    for i, (ids, plen) in enumerate(batch):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attn[i, : len(ids)] = 1
        labels[i, plen : len(ids)] = torch.tensor(ids[plen:])  # loss on the response (and EOS) only
    return input_ids, attn, labels


def warm_start_rows(task: str, n: int, seed: int, unboxed_share: float = 0.0) -> list[dict]:
    """The warm-start data: ``n`` train problems, an ``unboxed_share`` of them (drawn with the seed)
    ending in the bare answer ("The answer is 21") instead of the boxed one the reward requires."""
    rows = tasks.generate(task, n, seed=seed, split="train")
    if unboxed_share > 0:
        t = tasks.get_task(task)
        pick = random.Random(f"unboxed:{seed}")  # its own stream: unboxed_share=0 keeps the v3 data
        out = []
        for r in rows:
            if pick.random() < unboxed_share:
                boxed = t.answer_line(r["answer"])
                r = {**r, "solution": r["solution"][: -len(boxed)] + t.answer_line(r["answer"], boxed=False)}
            out.append(r)
        rows = out
    return rows


def warm_start(
    model, tokenizer, task: str, steps: int, seed: int, progress: bool = True, unboxed_share: float = 0.0
) -> float:
    """Supervised warm-start on the task's train split (see :func:`warm_start_rows`); returns the last
    step's loss."""
    rows = warm_start_rows(task, min(WARMUP_TRAIN_ROWS, steps * WARMUP_BATCH), seed, unboxed_share)
    data = _encode_rows(tokenizer, rows)
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=WARMUP_LR, weight_decay=0.0, betas=(0.9, 0.98))
    warm = max(1, steps // 10)

    def lr_at(step: int) -> float:  # linear warm-up, cosine decay to 10 %
        if step < warm:
            return (step + 1) / warm
        frac = (step - warm) / max(1, steps - warm)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    order: list[int] = []
    loss_value = float("nan")
    from tqdm.auto import tqdm

    bar = tqdm(range(steps), desc=f"warm-start tiny:{task}", disable=not progress)
    for _ in bar:
        if len(order) < WARMUP_BATCH:
            order = list(range(len(data)))
            rng.shuffle(order)
        batch = [data[order.pop()] for _ in range(WARMUP_BATCH)]
        input_ids, attn, labels = _collate(batch, tokenizer.pad_token_id)
        loss = model(input_ids=input_ids, attention_mask=attn, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loss_value = loss.item()
        bar.set_postfix(loss=f"{loss_value:.3f}")
    model.eval()
    return loss_value


@torch.no_grad()
def sample_responses(model, tokenizer, rows: list[dict], temperature: float, seed: int = 0) -> list[str]:
    """One response per row by sampling (temperature > 0) or greedy decoding (0)."""
    model.eval()
    torch.manual_seed(seed)
    texts: list[str] = []
    for start in range(0, len(rows), 50):
        chunk = rows[start : start + 50]
        enc = tokenizer(
            [r["prompt"] for r in chunk], return_tensors="pt", padding=True, add_special_tokens=False
        )
        kwargs = (
            dict(do_sample=True, temperature=temperature, top_p=1.0, top_k=0)
            if temperature > 0
            else dict(do_sample=False)
        )
        out = model.generate(
            **enc,
            max_new_tokens=MAX_NEW_TOKENS,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **kwargs,
        )
        texts += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return texts


_BARE_ANSWER = re.compile(re.escape(tasks.ANSWER_PREFIX) + r"([0-9]+)\s*$")


def answer_report(task: str, rows: list[dict], texts: list[str]) -> dict[str, float]:
    """``accuracy`` (the reward's view: a correct ``\\boxed{}`` answer), ``boxed_share`` (responses
    with a box) and ``solved`` (the right final number, boxed or bare: accuracy were every answer boxed)."""
    right = [tasks.check_answer(task, t, r["answer"]) for r, t in zip(rows, texts)]
    boxed = ["\\boxed{" in t for t in texts]
    bare = [_BARE_ANSWER.search(t) for t in texts]
    solved = [ok or (m is not None and m.group(1) == r["answer"]) for ok, m, r in zip(right, bare, rows)]
    n = max(1, len(rows))
    return {
        "accuracy": round(sum(right) / n, 3),
        "boxed_share": round(sum(boxed) / n, 3),
        "solved": round(sum(solved) / n, 3),
    }


def _check_unboxed_share(unboxed_share: float, warmup_steps: int) -> float:
    """``unboxed_share`` checked; 0 without a warm-start (a random model has no solutions to mix)."""
    if not 0.0 <= unboxed_share < 1.0:
        raise ModelError(
            f"unboxed_share={unboxed_share} is outside [0, 1): some warm-start solutions must show the boxed format"
        )
    if abs(round(unboxed_share * 100) - unboxed_share * 100) > 1e-6:
        raise ModelError(f"unboxed_share={unboxed_share} has more than two decimals: round it (e.g. 0.5)")
    return unboxed_share if warmup_steps else 0.0


def _write_build_info(path: Path, info: dict) -> None:
    (path / "treepo_tiny.json").write_text(json.dumps(info, indent=2) + "\n")


def make_tiny_model(
    out_dir: str | Path,
    task: str | None = "arith",
    size: str = "s",
    warmup_steps: int = 0,
    seed: int = 0,
    progress: bool = True,
    unboxed_share: float = 0.0,
) -> Path:
    """Build (and optionally warm-start) a tiny Qwen2 model with its tokenizer into ``out_dir``.

    ``task=None`` gives a byte-level tokenizer and no warm-start. ``unboxed_share`` of the warm-start
    solutions end in the bare answer (:func:`warm_start_rows`). ``out_dir`` must not exist yet; it
    appears complete or not at all. Returns ``out_dir``.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise ModelError(f"{out_dir} already exists: remove it or choose another output directory")
    if warmup_steps and task is None:
        raise ModelError(
            "warmup_steps > 0 needs a task to warm-start on: pass task='arith' or warmup_steps=0"
        )
    unboxed_share = _check_unboxed_share(unboxed_share, warmup_steps)
    if task is not None:
        tasks.get_task(task)
    t0 = time.perf_counter()
    tokenizer = build_tokenizer(task)
    config = build_config(size, tokenizer)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).float()
    info: dict = {
        "version": TINY_VERSION,
        "task": task,
        "size": size,
        "warmup_steps": warmup_steps,
        "unboxed_share": unboxed_share,
        "seed": seed,
        "params": sum(p.numel() for p in model.parameters()),
        "vocab_size": config.vocab_size,
    }
    if warmup_steps:
        t1 = time.perf_counter()
        loss = warm_start(model, tokenizer, task, warmup_steps, seed, progress, unboxed_share)
        info["warmup_final_loss"] = round(loss, 4)
        info["warmup_seconds"] = round(time.perf_counter() - t1, 1)
        t1 = time.perf_counter()
        held_out = tasks.generate(task, PASS_RATE_PROBLEMS, seed=seed, split="eval")
        info["eval_problems"] = len(held_out)
        for key, temperature in (("greedy", 0.0), ("t1", 1.0)):
            texts = sample_responses(model, tokenizer, held_out, temperature, seed)
            report = answer_report(task, held_out, texts)
            info[f"pass_rate_{key}"] = report.pop("accuracy")
            info.update({f"{k}_{key}": v for k, v in report.items()})
        info["eval_seconds"] = round(time.perf_counter() - t1, 1)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )  # no sampling defaults: vLLM would adopt them as its defaults for this model
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        info["build_seconds"] = round(time.perf_counter() - t0, 1)
        _write_build_info(tmp, info)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def parse_tiny_spec(spec: str) -> str:
    """The task of a ``tiny:<task>`` spec (``tiny:bytes`` = byte tokenizer, no task)."""
    if not spec.startswith("tiny:"):
        raise ModelError(f"{spec!r} is not a tiny model spec: write 'tiny:<task>', e.g. 'tiny:arith'")
    task = spec[len("tiny:") :]
    if task == "bytes":
        return task
    tasks.get_task(task)
    return task


def resolve_tiny(
    spec: str,
    size: str = "s",
    warmup_steps: int = 500,
    cache_dir: str | Path | None = None,
    seed: int = 0,
    progress: bool = True,
    unboxed_share: float = 0.5,
) -> Path:
    """The cached directory of ``spec`` ('tiny:<task>'), built on first use (once, even concurrently)."""
    task = parse_tiny_spec(spec)
    if size not in SIZES:
        raise ModelError(f"unknown tiny model size {size!r}: use one of {', '.join(SIZES)}")
    if task == "bytes" and warmup_steps:
        raise ModelError("tiny:bytes has no task to warm-start on: set the warm-up steps to 0")
    unboxed_share = _check_unboxed_share(unboxed_share, warmup_steps)
    root = tasks.treepo_cache_dir(cache_dir) / "models"
    # the unboxed share is in the name only when used, so unboxed_share=0 builds keep their cache entries
    unboxed = f"-unboxed{round(unboxed_share * 100)}" if unboxed_share else ""
    out = root / f"tiny-{task}-{size}-w{warmup_steps}{unboxed}-seed{seed}-v{TINY_VERSION}"
    if (out / "config.json").exists():
        return out
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second resolver waits here, then finds the finished build
        if not (out / "config.json").exists():
            make_tiny_model(
                out, None if task == "bytes" else task, size, warmup_steps, seed, progress, unboxed_share
            )
    return out
