"""Attribute-prediction (reward) model training (SteerLM step 1): backbone + linear head, masked MSE.

Every assistant turn with at least one label is a sample: the conversation up to and including that answer,
rendered and tokenized by `steerlm.reward.RewardScorer.encode` (the code path serving uses), with a target
per attribute and -100 where the attribute was not rated. With a Bradley-Terry loss (`--loss regular_bt|
margin_bt|scaled_bt`, HelpSteer2-Preference) a sample is a preference pair instead, both answers scored by
the same path and compared on one attribute output (`steer_train.preference`).
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Sequence

import torch

from steer_train import parallel
from steer_train.checkpoint import SaveSchedule
from steer_train.config import RMConfig
from steer_train.control_tokens import add_control_tokens, describe
from steer_train.data import Conversation, load_jsonl
from steer_train.loop import (
    adamw,
    all_sum,
    autocast,
    cosine_factor,
    epoch_order,
    on_gpu_unless_set,
)
from steer_train.lora import apply_lora, lora_settings, merge, save_adapter
from steer_train.metrics import plot_losses
from steer_train.models import base_spec
from steer_train.preference import BT_LOSSES, bt_loss, load_pairs
from steer_train.quality import rm_eval, rm_table
from steerlm.files import write_json
from steerlm.reward import (
    HEAD_FILE,
    RewardModel,
    RewardScorer,
    default_pooling,
    pad_batch,
    parse_attribute_weights,
    save_reward_model,
)
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


def preference_report(scorer: RewardScorer, pairs: list, index: int, batch_size: int) -> dict:
    """Share of held-out pairs whose chosen answer gets the higher reward (NeMo-Aligner's RM accuracy)."""
    if not pairs:
        return {}
    chosen = scorer.score([p.chosen.turns for p in pairs], [p.chosen.system for p in pairs], batch_size)[:, index]
    rejected = scorer.score([p.rejected.turns for p in pairs], [p.rejected.system for p in pairs], batch_size)[:, index]
    return {"pairs": len(pairs), "accuracy": float((chosen > rejected).mean())}


def train(cfg: RMConfig) -> Path:
    """Train the reward model, write the checkpoint (steerlm.reward layout) and eval.json to cfg.out."""
    from tqdm import tqdm
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    d, mode = parallel.start(cfg)
    out = Path(cfg.out)
    spec = base_spec(cfg.model, cfg.schema)
    weights = parse_attribute_weights(cfg.attribute_weights, spec.schema) if cfg.attribute_weights else None
    bt = cfg.loss in BT_LOSSES
    if bt and cfg.reward_attribute not in spec.schema.names:
        raise ValueError(f"--reward-attribute {cfg.reward_attribute!r} must be one of {', '.join(spec.schema.names)}")
    reward_index = spec.schema.names.index(cfg.reward_attribute) if bt else -1
    model_type = AutoConfig.from_pretrained(cfg.model).model_type
    pooling = default_pooling(model_type) if cfg.pooling == "auto" else cfg.pooling
    hf_tok = AutoTokenizer.from_pretrained(cfg.model)
    backbone = AutoModel.from_pretrained(cfg.model, dtype=torch.float32)
    added = add_control_tokens(backbone, hf_tok, spec.template, seed=cfg.seed)
    if added and d.main:
        print(describe(added))
    bf16 = on_gpu_unless_set(cfg.bf16, d)
    grad_ckpt = on_gpu_unless_set(cfg.grad_ckpt, d)
    if grad_ckpt:
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base_config = copy.deepcopy(backbone.config)
    if cfg.lora:
        backbone = apply_lora(backbone, lora_settings(cfg))
    model = RewardModel(backbone, len(spec.schema), pooling)
    scorer = RewardScorer(model, hf_tok.backend_tokenizer, spec, str(d.device), cfg.max_length)
    model.train()

    def unsharded_skeleton():
        skeleton = AutoModel.from_config(base_config)
        return RewardModel(apply_lora(skeleton, lora_settings(cfg)) if cfg.lora else skeleton, len(spec.schema), pooling)

    if bt:
        pairs = load_pairs(cfg.data, spec.schema)
        val_pairs = load_pairs(cfg.val_data, spec.schema) if cfg.val_data else []
        if not pairs:
            raise ValueError(f"{cfg.data}: no preference pairs; prepare HelpSteer2-Preference data first")
        encoded = [(scorer.encode(p.chosen.turns, p.chosen.system), scorer.encode(p.rejected.turns, p.rejected.system))
                   for p in pairs]
        margins = torch.tensor([p.margin for p in pairs], dtype=torch.float32)
    else:
        train_rows = samples(load_jsonl(cfg.data, spec.schema), spec)
        val_convs = load_jsonl(cfg.val_data, spec.schema) if cfg.val_data else []
        if not train_rows:
            raise ValueError(f"{cfg.data}: no assistant turn carries a label; annotate or prepare labelled data first")
        encoded = [scorer.encode(turns, system) for turns, system, _ in train_rows]
        targets = torch.tensor([r[2] for r in train_rows], dtype=torch.float32)

    per_rank = cfg.batch_size * cfg.grad_accum
    global_batch = per_rank * d.world
    steps_per_epoch = max(1, len(encoded) // global_batch)
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))

    head_lr = cfg.head_lr if cfg.head_lr is not None else cfg.lr * 10
    net = parallel.wrap(model, d, mode, bf16)
    opt = adamw([{"params": [p for p in model.backbone.parameters() if p.requires_grad], "lr": cfg.lr},
                 {"params": model.head.parameters(), "lr": head_lr}], weight_decay=cfg.weight_decay)
    warmup = min(cfg.warmup, total)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_factor(s, total, warmup, cfg.min_lr_ratio))
    start, metrics = parallel.resume_run(cfg, mode, model, opt, sched, d, total, samples=len(encoded), pooling=pooling)

    saves = SaveSchedule(cfg.save_every, cfg.save_minutes, d)
    bar = tqdm(total=total, initial=start, desc="rm", disable=not (cfg.progress and d.main), dynamic_ncols=True)
    order, order_epoch = [], -1
    loop_start = time.perf_counter()
    for step in range(start, total):
        t0 = time.perf_counter()
        epoch, k = divmod(step, steps_per_epoch)
        if epoch != order_epoch:
            order = epoch_order(len(encoded), cfg.seed, epoch)
            order_epoch = epoch
        picked = [order[(k * global_batch + i) % len(order)] for i in range(global_batch)]
        # The loss is a mean over the global batch: over rated labels (regression) or over pairs (BT).
        n_labels = len(picked) if bt else int((targets[picked] != MISSING).sum())
        mine = picked[d.rank * per_rank : (d.rank + 1) * per_rank]
        loss_sum, tokens = 0.0, 0
        for a in range(cfg.grad_accum):
            idx = mine[a * cfg.batch_size : (a + 1) * cfg.batch_size]
            seqs = [encoded[i][0] for i in idx] + [encoded[i][1] for i in idx] if bt else [encoded[i] for i in idx]
            ids, mask = pad_batch(seqs, scorer.pad_id, d.device)
            with parallel.accumulate(net, mode, last=a == cfg.grad_accum - 1):
                with autocast(d, bf16):
                    pred = net(ids, mask)
                if bt:
                    reward = pred[:, reward_index].float()
                    part = bt_loss(cfg.loss, reward[: len(idx)], reward[len(idx) :], margins[idx].to(d.device)).sum()
                else:
                    part = masked_mse_sum(pred.float(), targets[idx].to(d.device))
                (part / max(n_labels, 1) * d.world).backward()
            loss_sum += part.item()
            tokens += int(mask.sum())
        if cfg.grad_clip > 0:
            parallel.clip_grad_norm(model, cfg.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss = all_sum(loss_sum, d) / max(n_labels, 1)
        dt = time.perf_counter() - t0
        tok_s = all_sum(tokens, d) / dt
        metrics.log(step=step + 1, epoch=epoch, loss=loss, lr=sched.get_last_lr()[0], tokens_per_s=tok_s)
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tok_s:.0f}")
        bar.update(1)
        if saves.due(step + 1, total):
            parallel.save(out, step + 1, mode, model, opt, sched, d, cfg.keep)
    bar.close()
    metrics.log(event="end", step=total, train_seconds=time.perf_counter() - loop_start)

    final = parallel.gathered(model, unsharded_skeleton, d) if mode == "fsdp" else model
    if d.main:
        final.eval().to("cpu")
        if grad_ckpt and mode != "fsdp":
            final.backbone.gradient_checkpointing_disable()
        scorer = RewardScorer(final, hf_tok.backend_tokenizer, spec, "cpu", cfg.max_length)
        if bt:
            report = preference_report(scorer, val_pairs, reward_index, cfg.batch_size)
            if report:
                print(f"held-out preference accuracy {report['accuracy']:.3f} over {report['pairs']} pairs")
        else:
            # The same metrics `python -m steer_eval rm-eval` reports; attributes nobody rated are left out.
            report = rm_eval(scorer, spec.schema, val_convs, cfg.batch_size) if samples(val_convs, spec) else {}
            report = {name: m for name, m in report.items() if m["n"]}
            if report:
                print(rm_table(report))
        if report:
            metrics.log(step=total, held_out=report)
        _export(final, hf_tok, spec, cfg, out, weights)
        write_json(out / "eval.json", report)
        plot_losses(out / "metrics.jsonl", out / "loss.png", f"reward model {Path(cfg.data).name}")
        print(f"wrote reward model to {out} (pooling {pooling}; eval.json, metrics.jsonl, loss.png)")
    parallel.finish(d)
    return out


def _export(model: RewardModel, hf_tok, spec: SteerSpec, cfg: RMConfig, out: Path, weights: dict | None) -> None:
    """The reward checkpoint, or with --lora the adapter and head (and the merged checkpoint with --merge)."""
    if cfg.lora:
        from safetensors.torch import save_file

        adapter = save_adapter(model.backbone, out)
        hf_tok.save_pretrained(adapter)
        save_file({k: v.detach().float().contiguous() for k, v in model.head.state_dict().items()}, str(adapter / HEAD_FILE))
        if not cfg.merge:
            return
        model.backbone = merge(model.backbone)
    save_reward_model(out, model, hf_tok, spec, cfg.max_length, weights)
