"""Attribute-conditioned SFT (SteerLM step 3), a plain loop readable top to bottom.

Each conversation becomes the SFT sequence of `template.segments(train=True)`; the loss covers only the
answer text, its newline and the following `<extra_id_1>` (NeMo-Aligner's SteerLM SFT masking). Samples are packed into
fixed-length blocks; a block-diagonal causal mask and per-sample position ids keep packed samples from
seeing each other. One optimizer step consumes `global_batch = micro_batch * grad_accum * world` blocks in
an order fixed by the seed, so 1 process and N torchrun processes take the same steps, and a resumed run
continues exactly where its last checkpoint stopped.
"""

from __future__ import annotations

import copy
import time
from collections import deque
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from steer_train import parallel
from steer_train.checkpoint import SaveSchedule
from steer_train.config import SFTConfig
from steer_train.control_tokens import add_control_tokens, describe
from steer_train.data import Conversation, load_jsonl
from steer_train.loop import (
    Dist,
    adamw,
    all_sum,
    autocast,
    barrier,
    cosine_factor,
    epoch_order,
    on_gpu_unless_set,
)
from steer_train.lora import apply_lora, lora_settings, merge, save_adapter
from steer_train.metrics import plot_losses
from steer_train.models import base_spec, save_generator
from steerlm.template import PromptTemplate, Segment, Turn
from steerlm.tokenize import encode_segments

IGNORE = -100


# ---------------------------------------------------------------- data


def loss_labels(tok, template: PromptTemplate, conv: Conversation) -> tuple[list[int], list[int]]:
    """Token ids of the SFT sequence and its labels (IGNORE where no loss).

    An answer is the user segment that starts where the prompt for its turn ends; the template segment after
    it starts with `answer_end` + `turn_end` (the next turn's `<extra_id_1>`, or the final one), and the
    tokens of that stop string carry loss too, which is how the model learns to end its answer."""
    turns = list(conv.turns)
    segments = template.segments(turns, conv.system, train=True)
    ids, spans = encode_segments(tok, segments)
    labels = [IGNORE] * len(ids)
    seg_at, at = {}, 0
    for i, seg in enumerate(segments):
        seg_at[at] = i
        at += len(seg.text)
    stop = template.answer_end + template.turn_end
    stop_ids = encode_segments(tok, [Segment(stop, False)])[0]
    for t, turn in enumerate(turns):
        if not turn.answer:
            raise ValueError(f"turn {t} has an empty answer")
        prompt = template.render(turns[:t] + [Turn(turn.question, None, turn.labels)], conv.system)
        i = seg_at.get(len(prompt))
        if i is None or not segments[i].user or segments[i].text != turn.answer or i + 1 == len(segments):
            raise ValueError(f"turn {t}: the template does not render the answer as its own segment")
        a, b = spans[i]
        labels[a:b] = ids[a:b]
        a, _ = spans[i + 1]
        if not segments[i + 1].text.startswith(stop) or ids[a : a + len(stop_ids)] != stop_ids:
            raise ValueError(f"the tokenizer merges {stop!r} with the text after it; cannot mask the turn end")
        labels[a : a + len(stop_ids)] = stop_ids
    return ids, labels


def pack(samples: Sequence[tuple[list[int], list[int]]], seq_len: int) -> tuple[list[list[tuple]], int]:
    """Pack samples whole into blocks of at most seq_len tokens, few blocks: each block opens with the
    longest sample left and is filled with the subset of the remaining samples that leaves the least room
    (`_fullest_fill`). A sample longer than seq_len is truncated to seq_len and fills a block. Equal lengths
    are taken in input order, so the result depends only on the order given (the caller's seeded shuffle).
    Returns the blocks (lists of samples) and how many samples were truncated."""
    truncated = sum(1 for ids, _ in samples if len(ids) > seq_len)
    fitted = [(ids[:seq_len], labels[:seq_len]) for ids, labels in samples]
    waiting: dict[int, deque[int]] = {}  # length -> indices of the samples of that length not yet packed
    for i, (ids, _) in enumerate(fitted):
        waiting.setdefault(len(ids), deque()).append(i)

    def take(length: int) -> tuple:
        queue = waiting[length]
        i = queue.popleft()
        if not queue:
            del waiting[length]
        return fitted[i]

    blocks = []
    while waiting:
        longest = max(waiting)
        block = [take(longest)]
        block += [take(n) for n in _fullest_fill({n: len(q) for n, q in waiting.items()}, seq_len - longest)]
        blocks.append(block)
    return blocks, truncated


def _fullest_fill(counts: dict[int, int], room: int) -> list[int]:
    """Lengths (from `counts`: length -> how many) whose sum is the largest that fits in `room`: a subset
    sum over a bitset of reachable totals, stopped at the first exact fit. First-fit decreasing alone left
    a tenth of the demo data's 512-token blocks empty: its conversations are 90-230 tokens, too coarse for
    greedy filling."""
    # Longest first, each length as often as it is available and fits; lazily, as an exact fit usually
    # comes after a few items.
    items = (n for n in sorted(counts, reverse=True) if n <= room for _ in range(min(counts[n], room // n)))
    reach, tried = 1, []  # bit t of reach: some subset of the items tried sums to t
    limit = (1 << (room + 1)) - 1
    for n in items:
        tried.append((n, reach))
        reach |= (reach << n) & limit
        if reach >> room & 1:
            break
    total, chosen = reach.bit_length() - 1, []
    for n, earlier in reversed(tried):
        if not earlier >> total & 1:  # this total needs item n
            chosen.append(n)
            total -= n
    return chosen


def collate(blocks: Sequence[list[tuple]], seq_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    """input_ids, next-token targets (IGNORE where no loss, at each sample's last token and on padding),
    position_ids (restarting per sample) and doc ids (-1 for padding) per block."""
    n = len(blocks)
    ids = torch.full((n, seq_len), pad_id, dtype=torch.long)
    targets = torch.full((n, seq_len), IGNORE, dtype=torch.long)
    pos = torch.zeros((n, seq_len), dtype=torch.long)
    doc = torch.full((n, seq_len), -1, dtype=torch.long)
    for b, block in enumerate(blocks):
        at = 0
        for d, (s_ids, s_labels) in enumerate(block):
            k = len(s_ids)
            ids[b, at : at + k] = torch.tensor(s_ids)
            targets[b, at : at + k - 1] = torch.tensor(s_labels[1:])
            pos[b, at : at + k] = torch.arange(k)
            doc[b, at : at + k] = d
            at += k
        pos[b, at:] = torch.arange(seq_len - at)
    return {"input_ids": ids, "targets": targets, "position_ids": pos, "doc": doc}


def packed_mask(doc: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive 4D attention mask [B, 1, T, T]: causal and within one sample (padding, doc -1, attends to
    padding). Built once per batch in the compute dtype; sdpa would convert a boolean mask in every layer."""
    t = doc.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=doc.device).tril()
    allowed = (causal & (doc[:, :, None] == doc[:, None, :]))[:, None]
    return torch.zeros(allowed.shape, dtype=dtype, device=doc.device).masked_fill_(~allowed, torch.finfo(dtype).min)


def forward_logits(net, batch: dict[str, torch.Tensor], model, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of packed blocks through `net` (the model or its DDP wrapper): [B, T, vocab], or with `keep`
    (a [B, T] boolean) only at those positions, [n kept, vocab]. flash-attention kernels take per-sample
    position ids (varlen); eager and sdpa get an additive block-diagonal mask."""
    impl = getattr(model.config, "_attn_implementation", "eager") or "eager"
    kwargs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    if "flash" not in impl:
        dev = batch["doc"].device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else model.dtype
        kwargs["attention_mask"] = packed_mask(batch["doc"], dtype)
    if keep is not None:
        kwargs["logits_to_keep"] = keep
    return net(**kwargs).logits


def next_token_loss_sum(net, batch: dict[str, torch.Tensor], model) -> torch.Tensor:
    """Summed next-token cross entropy over the labelled positions. Only those positions go through the
    output layer: with SteerLM masking most tokens (system, prompts, headers) carry no loss, and the
    vocab-sized projection of the rest was most of a small model's step."""
    keep = batch["targets"] != IGNORE
    logits = forward_logits(net, batch, model, keep)
    return F.cross_entropy(logits.float(), batch["targets"][keep], reduction="sum")


def n_loss_tokens(blocks: Sequence[list[tuple]]) -> int:
    # A sample's first token is never a target (next-token shift), so its label does not count.
    return sum(1 for block in blocks for _, labels in block for lab in labels[1:] if lab != IGNORE)


# ---------------------------------------------------------------- training


def load_base(cfg: SFTConfig, d: Dist):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = base_spec(cfg.model, cfg.schema)
    if spec.kind != "generator":
        raise ValueError(f"{cfg.model} is a {spec.kind!r} checkpoint; SFT needs a causal LM")
    hf_tok = AutoTokenizer.from_pretrained(cfg.model)
    model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32)
    added = add_control_tokens(model, hf_tok, spec.template, seed=cfg.seed)
    if added and d.main:
        print(f"{describe(added)}; embeddings resized to {len(hf_tok)}")
    return model, hf_tok, spec



def evaluate(model, blocks: list, cfg: SFTConfig, pad_id: int, d: Dist, bf16: bool) -> float:
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(blocks), cfg.micro_batch):
            chunk = blocks[i : i + cfg.micro_batch]
            batch = {k: v.to(d.device) for k, v in collate(chunk, cfg.seq_len, pad_id).items()}
            with autocast(d, bf16):
                total += next_token_loss_sum(model, batch, model).item()
            count += n_loss_tokens(chunk)
    model.train()
    return total / max(count, 1)


def train(cfg: SFTConfig) -> Path:
    """Run SFT and write the final Hugging Face checkpoint to cfg.out (with --lora: OUT/adapter, and the
    merged checkpoint with --merge); returns cfg.out."""
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM

    d, mode = parallel.start(cfg)
    out = Path(cfg.out)
    model, hf_tok, spec = load_base(cfg, d)
    tok = hf_tok.backend_tokenizer
    pad_id = hf_tok.pad_token_id if hf_tok.pad_token_id is not None else 0

    def blocks_of(path: str, seed: int) -> list:
        samples, skipped = [], []
        for conv in load_jsonl(path, spec.schema):
            try:
                samples.append(loss_labels(tok, spec.template, conv))
            except ValueError as exc:
                skipped.append(f"{conv.id}: {exc}")
        if skipped and d.main:
            print(f"{path}: skipped {len(skipped)} conversations, e.g. {skipped[0]}")
        if not samples:
            raise ValueError(f"{path}: no usable conversations")
        order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed)).tolist()
        blocks, truncated = pack([samples[i] for i in order], cfg.seq_len)
        if truncated and d.main:
            print(f"{path}: {truncated} conversations longer than --seq-len {cfg.seq_len} were truncated")
        return blocks

    blocks = blocks_of(cfg.data, cfg.seed)
    val_blocks = blocks_of(cfg.val_data, cfg.seed) if cfg.val_data else []
    per_rank = cfg.micro_batch * cfg.grad_accum
    global_batch = per_rank * d.world
    steps_per_epoch = len(blocks) // global_batch
    if steps_per_epoch == 0:
        raise ValueError(
            f"{len(blocks)} packed blocks are fewer than one global batch of {global_batch} "
            "(micro batch x grad accum x processes); use more data or a smaller batch"
        )
    total = cfg.max_steps or max(1, int(cfg.epochs * steps_per_epoch))

    bf16 = on_gpu_unless_set(cfg.bf16, d)
    grad_ckpt = on_gpu_unless_set(cfg.grad_ckpt, d)
    if grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base_config = copy.deepcopy(model.config)
    if cfg.lora:
        model = apply_lora(model, lora_settings(cfg))

    def unsharded_skeleton():
        skeleton = AutoModelForCausalLM.from_config(base_config)
        return apply_lora(skeleton, lora_settings(cfg)) if cfg.lora else skeleton

    model.to(d.device).train()
    net = parallel.wrap(model, d, mode, bf16)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in trainable if p.ndim >= 2]
    no_decay = [p for n, p in trainable if p.ndim < 2]
    opt = adamw([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                lr=cfg.lr)
    warmup = min(cfg.warmup, total)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_factor(s, total, warmup, cfg.min_lr_ratio))

    start, metrics = parallel.resume_run(cfg, mode, model, opt, sched, d, total, blocks=len(blocks))

    saves = SaveSchedule(cfg.save_every, cfg.save_minutes, d)
    order, order_epoch = [], -1
    bar = tqdm(total=total, initial=start, desc="sft", disable=not (cfg.progress and d.main), dynamic_ncols=True)
    loop_start = time.perf_counter()
    for step in range(start, total):
        t0 = time.perf_counter()
        epoch, k = divmod(step, steps_per_epoch)
        if epoch != order_epoch:  # the block order of an epoch depends only on seed and epoch
            order = epoch_order(len(blocks), cfg.seed, epoch)
            order_epoch = epoch
        step_blocks = [blocks[i] for i in order[k * global_batch : (k + 1) * global_batch]]
        n_tokens = n_loss_tokens(step_blocks)
        mine = step_blocks[d.rank * per_rank : (d.rank + 1) * per_rank]
        loss_sum, tokens_seen = 0.0, 0
        for a in range(cfg.grad_accum):
            micro = mine[a * cfg.micro_batch : (a + 1) * cfg.micro_batch]
            batch = {key: v.to(d.device) for key, v in collate(micro, cfg.seq_len, pad_id).items()}
            with parallel.accumulate(net, mode, last=a == cfg.grad_accum - 1):
                with autocast(d, bf16):
                    part = next_token_loss_sum(net, batch, model)
                # DDP and FSDP average gradients over processes; scaling by world makes it a sum over the global batch.
                (part / max(n_tokens, 1) * d.world).backward()
            loss_sum += part.item()
            tokens_seen += int((batch["doc"] >= 0).sum())
        grad_norm = parallel.clip_grad_norm(model, cfg.grad_clip) if cfg.grad_clip > 0 else None
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)

        loss = all_sum(loss_sum, d) / max(n_tokens, 1)
        tokens = all_sum(tokens_seen, d)
        dt = time.perf_counter() - t0
        record = {"step": step + 1, "epoch": epoch, "loss": loss, "lr": sched.get_last_lr()[0],
                  "tokens_per_s": tokens / dt, "loss_tokens": n_tokens}
        if grad_norm is not None:
            record["grad_norm"] = float(grad_norm)
        if d.device.type == "cuda":
            record["peak_mem_gib"] = torch.cuda.max_memory_allocated(d.device) / 2**30
        metrics.log(**record)
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens / dt:.0f}", lr=f"{record['lr']:.2e}")
        bar.update(1)

        done = step + 1
        if val_blocks and cfg.eval_every and done % cfg.eval_every == 0 and done != total:
            _eval_and_log(model, val_blocks, cfg, pad_id, d, bf16, metrics, done, mode)
        if saves.due(done, total):
            parallel.save(out, done, mode, model, opt, sched, d, cfg.keep)
    bar.close()
    metrics.log(event="end", step=total, train_seconds=time.perf_counter() - loop_start)

    if val_blocks:
        _eval_and_log(model, val_blocks, cfg, pad_id, d, bf16, metrics, total, mode)
    final = parallel.gathered(model, unsharded_skeleton, d) if mode == "fsdp" else model
    if d.main:
        final.to("cpu")
        if grad_ckpt and mode != "fsdp":
            final.gradient_checkpointing_disable()
        _export(final, hf_tok, spec, cfg, out)
        plot_losses(out / "metrics.jsonl", out / "loss.png", f"SFT {Path(cfg.data).name}")
    parallel.finish(d)
    return out


def _export(model, hf_tok, spec, cfg: SFTConfig, out: Path) -> None:
    """The checkpoint, or with --lora the adapter (and the merged checkpoint with --merge)."""
    if not cfg.lora:
        save_generator(out, model, hf_tok, spec)
        print(f"wrote SteerLM checkpoint to {out} (metrics.jsonl, loss.png)")
        return
    adapter = save_adapter(model, out)
    hf_tok.save_pretrained(adapter)
    if cfg.merge:
        save_generator(out, merge(model), hf_tok, spec)
        print(f"wrote the LoRA adapter to {adapter} and the merged SteerLM checkpoint to {out}")
    else:
        print(f"wrote the LoRA adapter to {adapter} (rerun with --merge for a servable checkpoint)")


def _eval_and_log(model, blocks, cfg, pad_id, d, bf16, metrics, step, mode) -> None:
    # Under FSDP every process takes part in each forward (the blocks' weights are gathered from all).
    if d.main or mode == "fsdp":
        val = evaluate(model, blocks, cfg, pad_id, d, bf16)
        metrics.log(step=step, val_loss=val)
        if d.main:
            print(f"step {step}: validation loss {val:.4f}")
    barrier(d)
