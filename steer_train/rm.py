"""Attribute-prediction (reward) model training (SteerLM step 1): backbone + linear head, masked MSE.

Every assistant turn with at least one label is a sample: the conversation up to and including that answer,
rendered and tokenized by `steerlm.reward.RewardScorer.encode` (the code path serving uses), with a target
per attribute and -100 where the attribute was not rated.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from steer_train.config import RMConfig
from steer_train.loop import all_sum, autocast, barrier, cosine_factor, epoch_order, init_dist, on_gpu_unless_set, seed_all
from steer_train.metrics import Metrics, plot_losses
from steer_train.models import base_spec, ensure_control_tokens
from steer_train.data import Conversation, load_jsonl
from steerlm.files import write_json
from steerlm.reward import RewardModel, RewardScorer, default_pooling, pad_batch, save_reward_model
from steerlm.spec import SteerSpec

MISSING = -100.0


def samples(convs: Sequence[Conversation], spec: SteerSpec) -> list[tuple[list, str | None, list[float]]]:
    """(turns up to a rated answer, system, targets with MISSING) for every rated assistant turn."""
    out = []
    for conv in convs:
        for i, turn in enumerate(conv.turns):
            values = spec.schema.parse(turn.labels)
            if values:
                out.append((list(conv.turns[: i + 1]), conv.system, [float(values.get(n, MISSING)) for n in spec.schema.names]))
    return out


def masked_mse_sum(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    present = target != MISSING
    return ((pred - target).pow(2) * present).sum()


def held_out_report(scorer: RewardScorer, rows: list, batch_size: int) -> dict[str, dict]:
    """Per attribute: number of rated rows, mean absolute error and Pearson r of the raw predictions."""
    if not rows:
        return {}
    pred = scorer.score([r[0] for r in rows], [r[1] for r in rows], batch_size=batch_size)
    target = np.array([r[2] for r in rows], dtype=np.float32)
    report = {}
    for j, name in enumerate(scorer.spec.schema.names):
        present = target[:, j] != MISSING
        if not present.any():
            continue
        p, t = pred[present, j], target[present, j]
        r = float(np.corrcoef(p, t)[0, 1]) if present.sum() > 1 and p.std() > 0 and t.std() > 0 else None
        report[name] = {"n": int(present.sum()), "mae": float(np.abs(p - t).mean()), "pearson_r": r}
    return report


def format_report(report: dict[str, dict]) -> str:
    lines = [f"{'attribute':<14}{'n':>7}{'MAE':>9}{'Pearson r':>11}"]
    for name, m in report.items():
        r = "n/a" if m["pearson_r"] is None else f"{m['pearson_r']:.3f}"
        lines.append(f"{name:<14}{m['n']:>7}{m['mae']:>9.3f}{r:>11}")
    return "\n".join(lines)


def train(cfg: RMConfig) -> Path:
    """Train the reward model, write the checkpoint (steerlm.reward layout) and eval.json to cfg.out."""
    from torch.nn.parallel import DistributedDataParallel
    from tqdm import tqdm
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    d = init_dist(cfg.device)
    out = Path(cfg.out)
    seed_all(cfg.seed)
    spec = base_spec(cfg.model, cfg.schema)
    model_type = AutoConfig.from_pretrained(cfg.model).model_type
    pooling = default_pooling(model_type) if cfg.pooling == "auto" else cfg.pooling
    hf_tok = AutoTokenizer.from_pretrained(cfg.model)
    backbone = AutoModel.from_pretrained(cfg.model, dtype=torch.float32)
    ensure_control_tokens(backbone, hf_tok, spec.template)
    model = RewardModel(backbone, len(spec.schema), pooling)
    scorer = RewardScorer(model, hf_tok.backend_tokenizer, spec, str(d.device), cfg.max_length)
    model.train()

    train_rows = samples(load_jsonl(cfg.data, spec.schema), spec)
    val_rows = samples(load_jsonl(cfg.val_data, spec.schema), spec) if cfg.val_data else []
    if not train_rows:
        raise ValueError(f"{cfg.data}: no assistant turn carries a label; annotate or prepare labelled data first")
    encoded = [scorer.encode(turns, system) for turns, system, _ in train_rows]
    targets = torch.tensor([r[2] for r in train_rows], dtype=torch.float32)

    per_rank = cfg.batch_size * cfg.grad_accum
    global_batch = per_rank * d.world
    steps_per_epoch = max(1, len(encoded) // global_batch)
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))

    bf16 = on_gpu_unless_set(cfg.bf16, d)
    grad_ckpt = on_gpu_unless_set(cfg.grad_ckpt, d)
    if grad_ckpt:
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    head_lr = cfg.head_lr if cfg.head_lr is not None else cfg.lr * 10
    opt = torch.optim.AdamW(
        [{"params": backbone.parameters(), "lr": cfg.lr}, {"params": model.head.parameters(), "lr": head_lr}],
        weight_decay=cfg.weight_decay,
    )
    warmup = min(cfg.warmup, total)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_factor(s, total, warmup, cfg.min_lr_ratio))
    ddp = DistributedDataParallel(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None) if d.world > 1 else model
    metrics = Metrics(out / "metrics.jsonl", d.main, None)
    if d.main:
        metrics.log(event="start", step=0, config=asdict(cfg), world=d.world, samples=len(encoded), total_steps=total, pooling=pooling)

    bar = tqdm(total=total, desc="rm", disable=not (cfg.progress and d.main), dynamic_ncols=True)
    order, order_epoch = [], -1
    for step in range(total):
        t0 = time.perf_counter()
        epoch, k = divmod(step, steps_per_epoch)
        if epoch != order_epoch:
            order = epoch_order(len(encoded), cfg.seed, epoch)
            order_epoch = epoch
        picked = [order[(k * global_batch + i) % len(order)] for i in range(global_batch)]
        n_labels = int((targets[picked] != MISSING).sum())
        mine = picked[d.rank * per_rank : (d.rank + 1) * per_rank]
        loss_sum, tokens = 0.0, 0
        for a in range(cfg.grad_accum):
            idx = mine[a * cfg.batch_size : (a + 1) * cfg.batch_size]
            ids, mask = pad_batch([encoded[i] for i in idx], scorer.pad_id, d.device)
            sync = contextlib.nullcontext() if a == cfg.grad_accum - 1 or d.world == 1 else ddp.no_sync()
            with sync:
                with autocast(d, bf16):
                    pred = ddp(ids, mask)
                part = masked_mse_sum(pred.float(), targets[idx].to(d.device))
                (part / max(n_labels, 1) * d.world).backward()
            loss_sum += part.item()
            tokens += int(mask.sum())
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss = all_sum(loss_sum, d) / max(n_labels, 1)
        dt = time.perf_counter() - t0
        tok_s = all_sum(tokens, d) / dt
        metrics.log(step=step + 1, epoch=epoch, loss=loss, lr=sched.get_last_lr()[0], tokens_per_s=tok_s)
        bar.set_postfix(mse=f"{loss:.4f}", tok_s=f"{tok_s:.0f}")
        bar.update(1)
    bar.close()

    if d.main:
        model.eval()
        if grad_ckpt:
            backbone.gradient_checkpointing_disable()
        report = held_out_report(scorer, val_rows, cfg.batch_size)
        if report:
            print(format_report(report))
            metrics.log(step=total, held_out=report)
        model.to("cpu")
        save_reward_model(out, model, hf_tok, spec, cfg.max_length)
        write_json(out / "eval.json", report)
        plot_losses(out / "metrics.jsonl", out / "loss.png", f"reward model {Path(cfg.data).name}")
        print(f"wrote reward model to {out} (pooling {pooling}; eval.json, metrics.jsonl, loss.png)")
    barrier(d)
    return out
