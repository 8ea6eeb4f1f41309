"""Train the SynthVQA reference models from scratch and write checkpoints + metrics.

    python evaluation/reference/train.py --arch qwen2_vl,llava_onevision --out OUT --minutes 5.5
    python evaluation/reference/train.py --smoke --out /tmp/ref          # CPU, < 1 minute

For each architecture, OUT/<arch>/ receives the model (safetensors, float32), tokenizer, processor
(save_pretrained), metrics.json (validation history, final test accuracy overall and per question
type, a `vlmcompress.load` check) and train.log; OUT/metrics.json collects all of them.
On CUDA with several architectures, each trains in its own process at the same time on the one GPU
(the models are tiny, so one does not fill it), each for `--minutes` of optimisation.

Training: AdamW, float32 with TF32 matmuls on CUDA (`--bf16` for bf16 autocast), loss on the answer
tokens (and the closing <|im_end|>) only, time-based cosine schedule. Samples are drawn on the fly by
DataLoader workers (seeded, disjoint from the validation and test splits, which are seeded by split
name); half the training prompts end with the lmms-eval short-answer instruction so either prompt form
works at evaluation time. The training forward is `fast_forward.FastForward` (the same math with the
images batched), once a start-up check on a real batch shows it gives the plain model's loss and
gradients.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from evaluation.reference import models, synthvqa  # noqa: E402
from evaluation.reference.batching import Batcher  # noqa: E402
from evaluation.reference.fast_forward import RTOL, FastForward  # noqa: E402


# --------------------------------------------------------------------------- data


class TrainStream(torch.utils.data.IterableDataset):
    """Endless training batches; worker w of W builds batches k*W + w (sample indices never repeat).

    `weights` (a tensor in shared memory, so the training process can change it after the DataLoader
    workers started) gives the share of each question type in the batches. Batches are dicts of numpy
    arrays (sent through the workers' pipes) or, with `tensors`, of tensors (sent through shared memory).
    """

    def __init__(self, batcher: Batcher, batch_size: int, seed: int = 0, tensors: bool = True, follow_ups: int = 0,
                 follow_up_weights: dict | None = None, notes_share: float = 0.0):
        self.batcher, self.batch_size, self.seed, self.tensors = batcher, batch_size, seed, tensors
        self.follow_ups, self.follow_up_weights, self.notes_share = follow_ups, follow_up_weights, notes_share
        self.weights = torch.ones(len(synthvqa.TRAINING_TYPES)).share_memory_()

    def batch(self, b: int) -> dict:
        rng = random.Random(f"mix/{self.seed}/{b}")
        weights = self.weights.tolist()
        start = self.seed * 100_000_000 + b * self.batch_size
        samples = [synthvqa.make_training_sample(i, rng.choices(synthvqa.TRAINING_TYPES, weights)[0], self.follow_ups,
                                                 self.follow_up_weights, self.notes_share)
                   for i in range(start, start + self.batch_size)]
        out = self.batcher.cpu_batch(samples, rng)
        return {k: torch.from_numpy(v) for k, v in out.items()} if self.tensors else out

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, workers = (info.id, info.num_workers) if info else (0, 1)
        k = 0
        while True:
            yield self.batch(k * workers + wid)
            k += 1


class Rows(list):
    """SynthVQA rows as a plain list (no `datasets` needed here): rows["question"] is a column."""

    def __getitem__(self, key):
        if isinstance(key, str):
            return [row[key] for row in self]
        return super().__getitem__(key)

    def select(self, indices) -> "Rows":
        return Rows(list.__getitem__(self, i) for i in indices)


def split_rows(split: str, n: int) -> Rows:
    return Rows(synthvqa.make_sample(split, i) for i in range(n))


DESCRIBE_WEIGHT = 1.0  # the share of dense descriptions stays fixed (see synthvqa.TRAINING_TYPES)


def type_weights(acc: dict) -> list[float]:
    """More training on the question types the model gets wrong more often (validation accuracy)."""
    return [0.2 + 1.0 - acc["per_type"].get(t, 0.0) for t in synthvqa.QUESTION_TYPES] + [DESCRIBE_WEIGHT]


def _worker_init(_):
    torch.set_num_threads(1)


def _identity(batch):
    return batch


def shared_memory_free() -> float:
    """Free bytes in /dev/shm (where DataLoader tensors travel), inf where there is none to measure."""
    try:
        return float(shutil.disk_usage("/dev/shm").free)
    except OSError:
        return float("inf")


def training_forward(model, batcher: Batcher, device, follow_ups: int, log):
    """`FastForward(model)` when it gives the plain model's loss and gradients on a real batch, else `model`."""
    types = ("attribute", "long_context", "ocr", "describe")  # different lengths: a left-padded batch
    samples = [synthvqa.make_training_sample(10**9 + i, t, follow_ups) for i, t in enumerate(types)]
    batch = batcher.to_device(batcher.cpu_batch(samples, random.Random("verify")), device)
    try:
        fast = FastForward(model)
        problem = fast.verify(batch)
    except Exception as exc:  # an upstream change the fast path does not know: train with the plain model
        problem = f"{type(exc).__name__}: {exc}"
    if problem:
        log(f"fast forward differs from the plain model ({problem}): training with the plain forward")
        return model
    log(f"fast forward (images batched): loss and gradients equal the plain model's on a check batch "
        f"(float32, rtol {RTOL:.0e})")
    return fast


# --------------------------------------------------------------------------- evaluation


@torch.inference_mode()
def evaluate(model, processor, dataset, batch_size: int = 100, device=None) -> tuple[dict, list[str]]:
    """Greedy answers for a SynthVQA split and their accuracy."""
    preds = models.generate_answers(model, processor, dataset["question"], dataset["image"],
                                    batch_size=batch_size, device=device)
    return synthvqa.accuracy(preds, dataset["answers"], dataset["question_type"]), preds


def _fmt(acc: dict) -> str:
    per = " ".join(f"{t}={v:.3f}" for t, v in acc["per_type"].items())
    return f"overall={acc['overall']:.3f} | {per}"


# --------------------------------------------------------------------------- one architecture


class Logger:
    def __init__(self, path: Path, prefix: str):
        self.file = open(path, "a", buffering=1)
        self.prefix = prefix

    def __call__(self, msg: str):
        line = f"[{time.strftime('%H:%M:%S')}] {self.prefix} {msg}"
        print(line, flush=True)
        self.file.write(line + "\n")


def train_one(arch: str, args) -> dict:
    out = Path(args.out) / arch
    out.mkdir(parents=True, exist_ok=True)
    log = Logger(out / "train.log", f"[{arch}]")
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.manual_seed(args.seed)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.set_num_threads(args.threads)

    t0 = time.time()
    start_from = Path(args.init_from) / arch if args.init_from else None
    if start_from is not None and (start_from / "model.safetensors").is_file():
        # a later leg of a training that one machine session cannot hold: the weights, tokenizer and
        # processor of the earlier leg, a fresh optimiser (with its warm-up)
        from transformers import AutoModelForImageTextToText, AutoProcessor

        model = AutoModelForImageTextToText.from_pretrained(start_from, dtype=torch.float32)
        processor = AutoProcessor.from_pretrained(start_from)
        tokenizer = processor.tokenizer
        log(f"initialised from {start_from}")
        if args.grow_layers:
            models.grow_language_model(model, args.grow_layers)
            log(f"language model grown by {args.grow_layers} layers before its last one, "
                f"to {model.config.text_config.num_hidden_layers}")
    elif start_from is not None:
        raise SystemExit(f"--init-from: no {start_from / 'model.safetensors'}")
    else:
        tokenizer = models.build_tokenizer(arch)
        model, processor = models.build_model(arch, tokenizer, seed=args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    model.to(device).train()
    batcher = Batcher(processor, fast=not args.slow_batches)
    problem = batcher.verify([synthvqa.make_sample("train", i) for i in range(10**9, 10**9 + 10)]) if batcher.fast else None
    if problem:
        log(f"fast batches differ from the processor ({problem}): using the processor in the workers")
        batcher = Batcher(processor, fast=False)
    forward = model if args.plain_forward else training_forward(model, batcher, device, args.follow_ups, log)
    shm = shared_memory_free()
    # what the prefetched batches of both architectures hold at once, with a safety factor of 2
    tensors = not args.pipes and shm >= args.batch_size * 0.25 * 2**20 * 4 * max(1, args.workers) * 2 * 2
    log(f"batches: {'fast (uint8 images, pixel_values made on the device)' if batcher.fast else 'processor'}, "
        f"sent through {'shared memory' if tensors else 'pipes'} (/dev/shm free: {shm / 2**30:.1f} GiB)")
    stream = TrainStream(batcher, args.batch_size, args.seed, tensors, args.follow_ups, args.follow_up_weights,
                         args.notes_share)
    stream.weights.copy_(torch.tensor([0.8, 1.4, 1.0, 1.0, 0.8, 2 * DESCRIBE_WEIGHT]))  # descriptions first
    log(f"transformers {__import__('transformers').__version__}, torch {torch.__version__}, device {device}, "
        f"params {n_params / 1e6:.2f} M, vocab {len(tokenizer)}")

    val = split_rows("validation", args.val_n)
    test = split_rows("test", args.test_n)
    test_hard = None
    if args.notes_share:  # validation interleaved, so that the periodic validation's first rows hold both forms
        test_hard = split_rows("test_hard", args.test_n)
        val = Rows(row for pair in zip(val, split_rows("validation_hard", args.val_n)) for row in pair)
    log(f"validation {len(val)} and test {len(test)} samples built in {time.time() - t0:.1f} s")

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98), eps=1e-8, fused=cuda)
    loader = torch.utils.data.DataLoader(
        stream, batch_size=None, collate_fn=_identity, num_workers=args.workers, worker_init_fn=_worker_init,
        pin_memory=False, prefetch_factor=4 if args.workers else None, persistent_workers=bool(args.workers),
    )
    budget = args.minutes * 60.0
    history, step, seen, losses, skipped = [], 0, 0, [], 0
    train_time, last_eval = 0.0, 0.0
    start = time.time()
    it = iter(loader)
    while True:
        elapsed = time.time() - start
        if step >= args.max_steps or (args.max_steps_only is False and elapsed >= budget):
            break
        frac = min(1.0, max(elapsed / budget, step / args.max_steps))
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        batch = batcher.to_device(next(it), device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda and args.bf16):
            loss = forward(**batch).loss
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        # a non-finite gradient would turn every weight into NaN for good (seen once on LLaVA-OneVision):
        # skip that update and say so
        if torch.isfinite(grad_norm):
            opt.step()
        else:
            skipped += 1
            if skipped in (1, 10, 100) or skipped % 1000 == 0:
                log(f"step {step}: non-finite loss {loss.item():.4g} or gradient norm, update skipped ({skipped} so far)")
        opt.zero_grad(set_to_none=True)
        step += 1
        seen += batch["input_ids"].shape[0]
        losses.append(loss.detach())
        if step % args.log_every == 0:
            mean_loss = torch.stack(losses).float().mean().item()
            losses = []
            log(f"step {step} samples {seen} loss {mean_loss:.4f} lr {lr:.2e} {time.time() - start:.0f}s "
                f"({step / (time.time() - start):.1f} it/s)")
        now = time.time() - start
        if args.eval_every_s and now - last_eval >= args.eval_every_s and now < budget - 10:
            model.eval()
            acc, _ = evaluate(model, processor, val.select(range(min(len(val), args.val_every_n))), device=device)
            model.train()
            last_eval = time.time() - start
            stream.weights.copy_(torch.tensor(type_weights(acc)))
            history.append({"step": step, "seconds": round(last_eval, 1), "validation": acc,
                            "type_weights": [round(w, 3) for w in stream.weights.tolist()]})
            log(f"step {step} validation {_fmt(acc)}")
    train_time = time.time() - start
    log(f"trained {step} steps ({seen} samples, {skipped} updates skipped) in {train_time:.0f} s")
    del it, loader

    model.eval()
    val_acc, _ = evaluate(model, processor, val, device=device)
    log(f"final validation {_fmt(val_acc)}")
    t = time.time()
    test_acc, test_preds = evaluate(model, processor, test, device=device)
    log(f"final test ({len(test)}) {_fmt(test_acc)} [{time.time() - t:.1f} s]")
    test_hard_acc = None
    if test_hard:
        test_hard_acc, _ = evaluate(model, processor, test_hard, device=device)
        log(f"final test_hard ({len(test_hard)}) {_fmt(test_hard_acc)}")

    model.to("cpu")
    model.save_pretrained(out)
    processor.save_pretrained(out)
    metrics = {
        "arch": arch, "params": n_params, "steps": step, "samples": seen, "train_seconds": round(train_time, 1),
        "batch_size": args.batch_size, "lr": args.lr, "follow_ups": args.follow_ups,
        "follow_up_weights": args.follow_up_weights, "notes_share": args.notes_share, "skipped_updates": skipped,
        "init_from": str(start_from) if start_from else None,
        "fast_forward": forward is not model, "bf16": cuda and args.bf16,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "transformers": __import__("transformers").__version__, "torch": torch.__version__,
        "python": platform.python_version(),
        "visual_tokens": visual_tokens(model, processor),
        "validation": val_acc, "test": test_acc, "test_hard": test_hard_acc, "history": history,
        "test_examples": [{"question_id": q, "prediction": p, "answers": a}
                          for q, p, a in list(zip(test["question_id"], test_preds, test["answers"]))[:20]],
    }
    metrics["vlmcompress_load"] = check_vlmcompress_load(out, test, test_preds, device, log)
    if not args.smoke:
        metrics["kv_long_context"] = kv_sweep(out, test, device, log, deadline=args.t_start + args.sweep_until_minutes * 60)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    log(f"wrote {out} in {time.time() - t0:.0f} s total")
    return metrics


def visual_tokens(model, processor) -> int:
    sample = synthvqa.make_sample("test", 0)
    inputs = processor(text=[models.chat_prompt(processor, sample["question"])], images=[sample["image"]],
                       return_tensors="pt")
    return int((inputs["input_ids"] == model.config.image_token_id).sum())


def check_vlmcompress_load(path: Path, test, reference_preds: list[str], device, log) -> dict:
    """Reload the saved checkpoint with vlmcompress.load and compare greedy answers on a few samples."""
    try:
        import vlmcompress
        from transformers import AutoProcessor

        n = min(50, len(test))
        model = vlmcompress.load(str(path), dtype=torch.float32, attn_implementation="sdpa").to(device)
        processor = AutoProcessor.from_pretrained(str(path))
        sub = test.select(range(n))
        preds = models.generate_answers(model, processor, sub["question"], sub["image"], device=device)
        agree = sum(p == r for p, r in zip(preds, reference_preds[:n])) / n
        acc = synthvqa.accuracy(preds, sub["answers"], sub["question_type"])["overall"]
        log(f"vlmcompress.load: {n} test samples, agreement with in-memory model {agree:.3f}, accuracy {acc:.3f}")
        return {"ok": True, "n": n, "agreement": agree, "accuracy": acc}
    except Exception as exc:  # recorded, never fatal: the checkpoint itself is written already
        log(f"vlmcompress.load check failed: {type(exc).__name__}: {exc}")
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}


KV_SWEEP = {"streamingllm": {}, "snapkv": {"window_size": 16}, "h2o": {}}
KV_BUDGETS = (0.2, 0.1, 0.3)  # the tests' budget first, in case the sweep runs out of time


def kv_sweep(path: Path, test, device, log, n: int = 100, deadline: float = float("inf")) -> dict:
    """Accuracy on the long-context test questions under KV eviction, per method and budget."""
    results = {}
    try:
        import vlmcompress
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(str(path))
        sub = Rows(r for r in test if r["question_type"] == "long_context")[:n]
        sub = Rows(sub)
        for budget in KV_BUDGETS:
            for method, options in KV_SWEEP.items():
                if time.time() > deadline:
                    log(f"kv {method} budget {budget}: skipped (past --sweep-until-minutes)")
                    continue
                try:
                    model = vlmcompress.load(str(path), kv=method, kv_budget=budget, dtype=torch.float32,
                                             attn_implementation="sdpa", **options).to(device)
                    preds = models.generate_answers(model, processor, sub["question"], sub["image"], batch_size=100,
                                                    device=device)
                    acc = synthvqa.accuracy(preds, sub["answers"], sub["question_type"])["overall"]
                except Exception as exc:
                    acc = f"{type(exc).__name__}: {exc}"
                results[f"{method}@{budget}"] = acc
                log(f"kv {method} {options} budget {budget}: long_context accuracy {acc}")
    except Exception as exc:
        log(f"kv sweep failed: {type(exc).__name__}: {exc}")
        results["error"] = f"{type(exc).__name__}: {exc}"
    return results


# --------------------------------------------------------------------------- driver


def follow_up_weights(text: str) -> dict:
    """"relation=3,locate_pair=1" -> every follow-up kind's weight (synthvqa.follow_up_weights)."""
    given = {}
    for item in filter(None, text.split(",")):
        kind, _, value = item.partition("=")
        try:
            given[kind] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r}: give KIND=NUMBER, e.g. relation=3") from None
    try:
        return synthvqa.follow_up_weights(**given)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default=",".join(models.ARCHITECTURES),
                   help=f"comma-separated, from {models.ARCHITECTURES}")
    p.add_argument("--out", required=True, help="output folder; OUT/<arch>/ gets each checkpoint")
    p.add_argument("--minutes", type=float, default=7.0, help="optimisation time per architecture")
    p.add_argument("--init-from", default=None, metavar="DIR",
                   help="continue from DIR/<arch>/ (an earlier run's output): its weights, tokenizer and processor")
    p.add_argument("--grow-layers", type=int, default=0, metavar="N",
                   help="with --init-from: insert N no-op decoder layers before the language model's last one")
    p.add_argument("--max-steps", type=int, default=10**9)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--follow-ups", type=int, default=5,
                   help="more questions about each training image, asked as later turns (synthvqa.scene_questions)")
    p.add_argument("--follow-up-weights", type=follow_up_weights, default=None, metavar="KIND=W,...",
                   help="draw the follow-ups' kinds unevenly, e.g. relation=3,row_of=1; unnamed kinds weigh 1 "
                        f"({','.join(synthvqa.FOLLOW_UP_KINDS)}) or 0 ({','.join(synthvqa.EXTRA_FOLLOW_UP_KINDS)})")
    p.add_argument("--notes-share", type=float, default=0.0, metavar="P",
                   help="ask this share of the training questions after a block of irrelevant notes, as the hard "
                        "splits do; then validation mixes validation_hard in and the hard test split is scored too")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers per architecture")
    p.add_argument("--threads", type=int, default=2, help="torch threads of each training process")
    p.add_argument("--val-n", type=int, default=synthvqa.SPLIT_SIZES["validation"])
    p.add_argument("--val-every-n", type=int, default=300, help="validation samples scored during training")
    p.add_argument("--test-n", type=int, default=synthvqa.SPLIT_SIZES["test"])
    p.add_argument("--eval-every-s", type=float, default=45.0)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--pipes", action="store_true", help="send batches through pipes, not shared memory")
    p.add_argument("--slow-batches", action="store_true", help="run the full processor in the workers")
    # float32 by default: the step is bound by kernel launches, not arithmetic, and bf16 rounding erased the
    # small token-to-token differences of collapsed visual tokens in the first runs
    p.add_argument("--bf16", action="store_true", help="bf16 autocast on CUDA")
    p.add_argument("--plain-forward", action="store_true", help="train with the upstream forward, not FastForward")
    p.add_argument("--sequential", action="store_true", help="train the architectures one after the other")
    p.add_argument("--parallel", action="store_true", help="one process per architecture (default on CUDA)")
    p.add_argument("--smoke", action="store_true", help="a few CPU steps on a few samples, for tests")
    p.add_argument("--sweep-until-minutes", type=float, default=7.25,
                   help="start no more settings of the closing KV-eviction sweep once the run is this old")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.t_start = time.time()
    args.max_steps_only = False
    if args.smoke:
        args.device = "cpu"
        args.max_steps = min(args.max_steps, 3)
        args.max_steps_only = True
        args.batch_size = min(args.batch_size, 4)
        args.val_n, args.val_every_n, args.test_n = 10, 5, 10
        args.eval_every_s, args.log_every, args.warmup = 0, 1, 1
        args.workers = 0 if args.workers is None else args.workers
        args.minutes = 1e9
        args.threads = min(args.threads, 2)
    if not 0.0 <= args.notes_share <= 1.0:
        p.error(f"--notes-share is a probability: give a value in [0, 1], not {args.notes_share}")
    if args.grow_layers and not args.init_from:
        p.error("--grow-layers adds layers to a trained checkpoint: give --init-from too")
    archs = [a.strip() for a in args.arch.split(",") if a.strip()]
    for a in archs:
        if a not in models.ARCHITECTURES:
            p.error(f"unknown --arch {a!r}; choose from {models.ARCHITECTURES}")
    args.archs = archs
    if args.workers is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
        parallel = 1 if args.sequential or args.device == "cpu" else len(archs)
        args.workers = max(1, (cpus - parallel) // parallel - (0 if cpus <= 4 else 1))
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    results = {}
    parallel = args.parallel or (args.device.startswith("cuda") and not args.sequential)
    if len(args.archs) > 1 and parallel and not args.child:
        raw = sys.argv[1:] if argv is None else list(argv)
        procs = {}
        for arch in args.archs:
            cmd = [sys.executable, str(Path(__file__).resolve()), *_without_arch(raw), "--arch", arch, "--child",
                   "--workers", str(args.workers)]
            procs[arch] = subprocess.Popen(cmd)
        codes = {arch: p.wait() for arch, p in procs.items()}
        for arch in args.archs:
            path = out / arch / "metrics.json"
            results[arch] = json.loads(path.read_text()) if path.exists() else {"error": f"exit code {codes[arch]}"}
    else:
        for arch in args.archs:
            results[arch] = train_one(arch, args)
    if not args.child:
        summary = {arch: {k: r.get(k) for k in ("test", "test_hard", "validation", "steps", "samples", "train_seconds",
                                              "params", "visual_tokens", "vlmcompress_load", "error")}
                   for arch, r in results.items()}
        summary["wall_seconds"] = round(time.time() - t0, 1)
        (out / "metrics.json").write_text(json.dumps(summary, indent=1))
        print(json.dumps({a: (r.get("test") or {}).get("per_type") for a, r in results.items()}, indent=1))
        print(f"total wall time {time.time() - t0:.0f} s; outputs in {out}")
        failed = [a for a, r in results.items() if "error" in r]
        if failed:
            raise SystemExit(f"training failed for {failed}")
    return results


def _without_arch(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--arch":
            skip = True
            continue
        if a.startswith("--arch=") or a == "--workers" or a.startswith("--workers="):
            if a == "--workers":
                skip = True
            continue
        out.append(a)
    return out


if __name__ == "__main__":
    main()
