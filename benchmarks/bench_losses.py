#!/usr/bin/env python
"""Micro-benchmark of the contrastive losses (CPU by default).

Usage:  python benchmarks/bench_losses.py [--quick] [--only crd] [--crd-k K] [--json PATH] [--threads N]
                                         [--device cpu|cuda]

What it shows (printed as markdown tables, optionally written as JSON):

1. Forward+backward time of ``ckd_loss``, ``mcld_loss`` (instance + sample + category terms) and ``dcd_loss``
   over a grid of batch sizes B and class counts C, with ``time / (B^2 * C)``: the logit losses cost
   O(B^2 * C) (MCLD's category term is O(C^2 * B)); DCD works on 128-d embeddings, so its cost is
   O(B^2 * D) with D = 128 whatever C is. At small sizes a fixed per-call overhead dominates, so the
   normalised time only settles at large B * C; the "B exponent" column is the log-log slope of time
   between the two largest batch sizes (2 means quadratic).
2. Independence from the dataset size: CKD/MCLD only ever see the batch, their cost cannot depend on the
   number of training samples. CRD's memory-bank loss is timed beside CKD for n_data = 10k / 50k / 100k:
   CRD's state (two n_data x 128 banks) grows linearly with n_data and it needs the sample indices; its
   per-step time grows with n_data too while it scores the whole memory (a dense product, used up to
   ``CRDMemory.FULL_PRODUCT_MAX_RATIO * (K+1)`` rows) and is set by the K negatives it gathers beyond that.
   The CRD step includes drawing its negatives as released (``negatives="exact"``: per anchor, K samples of
   the other classes without replacement; labels: n_data / 100 samples in each of 100 classes, as CIFAR-100);
   the draw is also timed alone, beside the uniform with-replacement draw (``negatives="uniform"``) and a
   whole CRD step with it. ``--only crd`` runs this section alone.
3. The losses next to the networks: forward time (no_grad, eval) of resnet8x4 and resnet32x4 for the same
   batch, from ``ckd_study.models.create_model``; if the model zoo cannot be imported the section is
   skipped and the reason printed.

No timing assertion lives in the tests; this script is for reading.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ckd_study.losses import CRDMemory, ckd_loss, crd_loss, dcd_loss, mcld_loss  # noqa: E402

DCD_DIM = 128
CRD_DIM = 128
CRD_CLASSES = 100  # the benchmark's CRD labels: balanced over 100 classes, as CIFAR-100


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# Repeat a measurement at least ``repeats`` times and until MIN_TOTAL_S seconds were spent (at most
# MAX_REPEATS times); the *minimum* is reported: on a shared machine the minimum is the least disturbed run
# (other processes only ever add time), the median is kept in the JSON.
MIN_TOTAL_S = 0.5
MAX_REPEATS = 100
TIMINGS: list[dict] = []


def time_it(fn, device: torch.device, repeats: int, warmup: int = 1, label: str = "") -> float:
    """Minimum wall time of ``fn()`` in seconds over >= ``repeats`` runs (median recorded in TIMINGS)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    while len(times) < repeats or (sum(times) < MIN_TOTAL_S and len(times) < MAX_REPEATS):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    TIMINGS.append({"label": label, "n": len(times), "min_s": min(times), "median_s": statistics.median(times)})
    return min(times)


def loss_steps(b: int, c: int, device: torch.device, seed: int = 0):
    """Closures doing forward + backward of each loss on fresh random inputs of shape (B, C)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    s = torch.randn(b, c, generator=g).to(device).requires_grad_()
    t = torch.randn(b, c, generator=g).to(device)
    y = torch.randint(0, c, (b,), generator=g).to(device)
    e = torch.randn(b, DCD_DIM, generator=g).to(device).requires_grad_()
    f = torch.randn(b, DCD_DIM, generator=g).to(device).requires_grad_()
    theta = torch.tensor(1.0, device=device, requires_grad=True)
    bias = torch.tensor(0.0, device=device, requires_grad=True)

    def ckd():
        torch.autograd.grad(ckd_loss(s, t).total, [s])

    def mcld():
        torch.autograd.grad(mcld_loss(s, t, y).total, [s])

    def dcd():
        torch.autograd.grad(dcd_loss(e, f, theta, bias).total, [e, f, theta])

    return {"ckd": ckd, "mcld": mcld, "dcd": dcd}


def bench_grid(batches, classes, device, repeats):
    rows = []
    dcd_done = {}
    for c in classes:
        for b in batches:
            steps = loss_steps(b, c, device)
            row = {"B": b, "C": c}
            for name in ("ckd", "mcld"):
                sec = time_it(steps[name], device, repeats, label=f"{name} B={b} C={c}")
                row[f"{name}_ms"] = sec * 1e3
                row[f"{name}_ns_per_B2C"] = sec * 1e9 / (b * b * c)
            # MCLD = instance (B^2 C) + sample (B^2 C) + category (C^2 B) similarity matrices
            row["mcld_ns_per_work"] = row["mcld_ms"] * 1e6 / (2 * b * b * c + c * c * b)
            if b not in dcd_done:  # DCD does not depend on C (it sees 128-d embeddings)
                dcd_done[b] = time_it(steps["dcd"], device, repeats, label=f"dcd B={b} D={DCD_DIM}")
            row["dcd_ms"] = dcd_done[b] * 1e3
            row["dcd_ns_per_B2D"] = dcd_done[b] * 1e9 / (b * b * DCD_DIM)
            rows.append(row)
            print(f"  B={b:5d} C={c:5d}  ckd {row['ckd_ms']:9.2f} ms  mcld {row['mcld_ms']:9.2f} ms  "
                  f"dcd {row['dcd_ms']:9.2f} ms", file=sys.stderr, flush=True)
    return rows


def exponents(rows, batches):
    """log-log slope of time vs B between the two largest batch sizes, per C."""
    out = {}
    if len(batches) < 2:
        return out
    b1, b2 = sorted(batches)[-2:]
    for c in sorted({r["C"] for r in rows}):
        r1 = next(r for r in rows if r["C"] == c and r["B"] == b1)
        r2 = next(r for r in rows if r["C"] == c and r["B"] == b2)
        out[c] = {k: math.log(r2[f"{k}_ms"] / r1[f"{k}_ms"]) / math.log(b2 / b1) for k in ("ckd", "mcld", "dcd")}
    return out


def bench_crd(n_datas, batch, nce_k, classes, device, repeats):
    rows = []
    steps = loss_steps(batch, classes, device)
    g = torch.Generator(device="cpu").manual_seed(1)
    xs = torch.nn.functional.normalize(torch.randn(batch, CRD_DIM, generator=g), dim=1).to(device).requires_grad_()
    xt = torch.nn.functional.normalize(torch.randn(batch, CRD_DIM, generator=g), dim=1).to(device).requires_grad_()
    for n in n_datas:
        labels = (torch.arange(n) % CRD_CLASSES).to(device)  # balanced, as CIFAR-100
        mem = CRDMemory(CRD_DIM, n, nce_k=nce_k, generator=torch.Generator().manual_seed(0), labels=labels).to(device)
        mem_uniform = CRDMemory(CRD_DIM, n, nce_k=nce_k, generator=torch.Generator().manual_seed(0),
                                negatives="uniform").to(device)
        idx = torch.randperm(n, generator=g)[:batch].to(device)

        def crd(memory=mem):
            out_s, out_t = memory(xs, xt, idx)
            torch.autograd.grad(crd_loss(out_s, out_t, n), [xs, xt])

        crd_sec = time_it(crd, device, repeats, label=f"crd n_data={n} K={nce_k} (exact negatives)")
        sample_sec = time_it(lambda: mem.sampler(idx), device, repeats,
                             label=f"crd exact negatives alone n_data={n} K={nce_k}")
        uniform_sample_sec = time_it(lambda: mem_uniform._draw_contrast_index(idx), device, repeats,
                                     label=f"crd uniform negatives alone n_data={n} K={nce_k}")
        crd_uniform_sec = time_it(lambda: crd(mem_uniform), device, repeats,
                                  label=f"crd n_data={n} K={nce_k} (uniform negatives)")
        dense_default = n <= CRDMemory.FULL_PRODUCT_MAX_RATIO * (nce_k + 1)
        # both scorings, whichever is the default at this size: the instance attribute overrides the class's
        mem.FULL_PRODUCT_MAX_RATIO = 10**9 if not dense_default else 0
        other_sec = time_it(crd, device, repeats, label=f"crd n_data={n} K={nce_k} (other scoring)")
        dense_sec, gather_sec = (crd_sec, other_sec) if dense_default else (other_sec, crd_sec)
        ckd_sec = time_it(steps["ckd"], device, repeats, label=f"ckd B={batch} C={classes} (beside crd n_data={n})")
        bank_mb = sum(buf.numel() * buf.element_size() for buf in (mem.memory_student, mem.memory_teacher)) / 2**20
        rows.append({"n_data": n, "B": batch, "nce_k": nce_k, "crd_ms": crd_sec * 1e3, "crd_bank_MiB": bank_mb,
                     "crd_scoring": "dense" if dense_default else "gather", "crd_dense_ms": dense_sec * 1e3,
                     "crd_gather_ms": gather_sec * 1e3, "crd_negatives": "exact",
                     "negative_pool": n - n // CRD_CLASSES, "exact_sampling_ms": sample_sec * 1e3,
                     "uniform_sampling_ms": uniform_sample_sec * 1e3, "crd_uniform_ms": crd_uniform_sec * 1e3,
                     "ckd_C": classes, "ckd_ms": ckd_sec * 1e3, "ckd_state_MiB": 0.0})
        print(f"  n_data={n:7d}  crd {crd_sec * 1e3:9.2f} ms (exact draw alone {sample_sec * 1e3:.2f} ms; "
              f"uniform: crd {crd_uniform_sec * 1e3:.2f} ms, draw {uniform_sample_sec * 1e3:.2f} ms)  "
              f"ckd {ckd_sec * 1e3:9.2f} ms", file=sys.stderr, flush=True)
        del mem, mem_uniform
    return rows


def bench_models(names, batches, classes, device, repeats, loss_rows, warmup=1):
    try:
        from ckd_study.models import create_model
    except Exception as exc:  # the model zoo is written concurrently; do not fail the loss benchmark
        msg = f"model section skipped: cannot import ckd_study.models.create_model ({type(exc).__name__}: {exc})"
        print(msg, file=sys.stderr)
        return [], msg
    rows = []
    for name in names:
        try:
            model = create_model(name, classes).to(device).eval()
            with torch.no_grad():  # cheap warm-up of the kernels / allocator on a tiny batch
                model(torch.randn(8, 3, 32, 32, device=device))
        except Exception as exc:
            msg = f"model section skipped: create_model({name!r}) failed ({type(exc).__name__}: {exc})"
            print(msg, file=sys.stderr)
            return rows, msg
        for b in batches:
            x = torch.randn(b, 3, 32, 32, device=device)

            def fwd():
                with torch.no_grad():
                    model(x)

            sec = time_it(fwd, device, repeats, warmup=warmup, label=f"{name} forward B={b}")
            lr = next((r for r in loss_rows if r["B"] == b and r["C"] == classes), None)
            if lr is None:
                steps = loss_steps(b, classes, device)
                lr = {"ckd_ms": time_it(steps["ckd"], device, 3, label=f"ckd B={b} C={classes}") * 1e3,
                      "mcld_ms": time_it(steps["mcld"], device, 3, label=f"mcld B={b} C={classes}") * 1e3}
            row = {"model": name, "B": b, "forward_ms": sec * 1e3, "ckd_ms": lr["ckd_ms"], "mcld_ms": lr["mcld_ms"],
                   "ckd_pct_of_forward": 100 * lr["ckd_ms"] / (sec * 1e3),
                   "mcld_pct_of_forward": 100 * lr["mcld_ms"] / (sec * 1e3)}
            rows.append(row)
            print(f"  {name} B={b}: forward {sec * 1e3:.1f} ms", file=sys.stderr, flush=True)
        del model
    return rows, None


def pick_threads(requested):
    """Threads to use: ``--threads`` if given, else the cores that are idle at start.

    Idle cores = usable cores - 1-minute load average (rounded), at least 1. On a shared machine, running
    2 OpenMP threads on 2 cores while another process keeps one busy makes every parallel region wait for a
    descheduled thread (measured here: 0.5 ms -> 65 ms for a small CKD step), so "as available" means idle.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if requested:
        return requested, f"--threads {requested} ({cores} cores)"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    idle = max(1, min(cores, cores - int(round(load))))
    return idle, f"{idle} of {cores} cores (idle at start: 1-min load average {load:.2f}; override with --threads)"


def md_table(headers, rows):
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small grid, few repeats (< 60 s on 2 CPU cores)")
    ap.add_argument("--json", type=Path, default=None, help="write the results as JSON to this path")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all available cores)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--only", choices=["crd"], default=None, help="run one section only (crd: section 2)")
    ap.add_argument("--crd-k", type=int, default=None, help="CRD's K negatives (default 16384; --quick: 4096)")
    args = ap.parse_args(argv)

    threads, thread_note = pick_threads(args.threads)
    torch.set_num_threads(threads)
    device = torch.device(args.device)
    torch.manual_seed(0)

    global MIN_TOTAL_S
    if args.quick:
        # K=4096 instead of CRD's 16384 keeps --quick under a minute on 2 cores (one CRD step at K=16384
        # gathers 2 x 64 x 16385 x 128 floats = 1 GiB on CPU); the full run uses 16384.
        batches, classes, repeats = [64, 256, 1024], [10, 100, 1000], 3
        crd_ns, crd_k, crd_rep = [10_000, 50_000, 100_000], 4096, 3
        model_batches, model_rep, model_warmup = [64, 128], 1, 0
        MIN_TOTAL_S = 0.2
    else:
        batches, classes, repeats = [64, 128, 256, 512, 1024], [10, 100, 1000], 7
        crd_ns, crd_k, crd_rep = [10_000, 50_000, 100_000], 16384, 3
        model_batches, model_rep, model_warmup = [64, 128], 3, 1
    if args.crd_k:
        crd_k = args.crd_k
    crd_only = args.only == "crd"

    t_start = time.perf_counter()
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"# loss micro-benchmark ({'quick' if args.quick else 'full'}), device={device}, "
          f"torch {torch.__version__}, threads={torch.get_num_threads()}: {thread_note}", flush=True)
    print("(times: minimum over repeated runs, in ms; a loaded machine inflates them: compare within one run)")

    grid, expo, model_rows, model_skip = [], {}, [], "not run (--only crd)"
    if not crd_only:
        print("timing the loss grid ...", file=sys.stderr, flush=True)
        grid = bench_grid(batches, classes, device, repeats)
        expo = exponents(grid, batches)
    print("timing CRD vs dataset size ...", file=sys.stderr, flush=True)
    crd_rows = bench_crd(crd_ns, 64, crd_k, 100, device, crd_rep)
    if not crd_only:
        print("timing model forwards ...", file=sys.stderr, flush=True)
        model_rows, model_skip = bench_models(["resnet8x4", "resnet32x4"], model_batches, 100, device, model_rep,
                                              grid, warmup=model_warmup)
    elapsed = time.perf_counter() - t_start

    if not crd_only:
        print_loss_grid(grid, expo, batches)
    print_crd(crd_rows, crd_k)
    if not crd_only:
        print_models(model_rows, model_skip)
    print()
    print(f"total benchmark time: {elapsed:.1f} s")

    if args.json:
        payload = {
            "mode": ("quick" if args.quick else "full") + (" (only crd)" if crd_only else ""),
            "device": str(device),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "threads_note": thread_note,
            "platform": platform.platform(),
            "processor": platform.processor(),
            "repeats_min": repeats,
            "min_total_s": MIN_TOTAL_S,
            "load_average_start": load,
            "load_average_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "timings": TIMINGS,
            "loss_grid": grid,
            "b_exponent": {str(k): v for k, v in expo.items()},
            "crd_vs_n_data": crd_rows,
            "models": model_rows,
            "models_skipped": model_skip,
            "elapsed_s": elapsed,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2))
        print(f"wrote {args.json}")


def print_loss_grid(grid, expo, batches):
    print()
    print("## 1. Forward+backward time of the losses (ms) and time / (B²·C)")
    print()
    print("CKD and MCLD on (B, C) logits; DCD on (B, 128) embeddings (its cost is B²·D, D=128, independent of C;")
    print("its normalised column divides by B²·128). MCLD = 2 B×B terms + a C×C category term, so its work is")
    print("2B²C + C²B (last column); its ns/(B²C) rises when C > B. Normalised times settle once the sizes are")
    print("large enough to hide the fixed per-call overhead.")
    print()
    print(md_table(
        ["B", "C", "CKD ms", "CKD ns/(B²C)", "MCLD ms", "MCLD ns/(B²C)", "DCD ms", "DCD ns/(B²D)",
         "MCLD ns/(2B²C+C²B)"],
        [[r["B"], r["C"], f"{r['ckd_ms']:.2f}", f"{r['ckd_ns_per_B2C']:.4f}", f"{r['mcld_ms']:.2f}",
          f"{r['mcld_ns_per_B2C']:.4f}", f"{r['dcd_ms']:.2f}", f"{r['dcd_ns_per_B2D']:.4f}",
          f"{r['mcld_ns_per_work']:.4f}"] for r in grid],
    ))
    if expo:
        b1, b2 = sorted(batches)[-2:]
        print()
        print(f"Growth exponent in B (log-log slope of time between B={b1} and B={b2}; 2 = quadratic):")
        print()
        print(md_table(["C", "CKD", "MCLD", "DCD"],
                       [[c, f"{e['ckd']:.2f}", f"{e['mcld']:.2f}", f"{e['dcd']:.2f}"] for c, e in expo.items()]))


def print_crd(crd_rows, crd_k):
    print()
    print("## 2. Dataset size: CRD's memory bank vs CKD (B=64; CKD at C=100)")
    print()
    print("CKD (and MCLD, DCD) only see the batch: no argument of theirs depends on the training-set size, so")
    print("their cost cannot change with it (the CKD column is re-timed beside each n_data). CRD keeps two")
    print("n_data x 128 memory banks: its state grows linearly with n_data and it needs every sample's dataset")
    print(f"index. Its step time grows with n_data while it scores the whole memory with one dense product (up to "
          f"{CRDMemory.FULL_PRODUCT_MAX_RATIO}*(K+1) = {CRDMemory.FULL_PRODUCT_MAX_RATIO * (crd_k + 1)} rows), "
          f"beyond that it gathers the K={crd_k} negatives' rows.")
    print()
    print(md_table(["n_data", "CRD ms (K=%d)" % crd_k, "scoring", "dense ms", "gather ms", "CRD bank MiB", "CKD ms",
                    "CKD state MiB"],
                   [[r["n_data"], f"{r['crd_ms']:.2f}", r["crd_scoring"], f"{r['crd_dense_ms']:.2f}",
                     f"{r['crd_gather_ms']:.2f}", f"{r['crd_bank_MiB']:.1f}", f"{r['ckd_ms']:.2f}", "0"]
                    for r in crd_rows]))
    print()
    print("Drawing CRD's negatives (included in the CRD times above, which use the released 'exact' draw): per")
    print("anchor, K samples of the other classes without replacement (B x n_data random keys and a top-K; with")
    print("replacement where K exceeds the pool), against the uniform draw with replacement (B x (K+1) random")
    print("integers) and a whole CRD step with that draw.")
    print()
    print(md_table(["n_data", "pool", "K", "exact draw ms", "uniform draw ms", "CRD ms (exact)", "CRD ms (uniform)"],
                   [[r["n_data"], r["negative_pool"], r["nce_k"], f"{r['exact_sampling_ms']:.2f}",
                     f"{r['uniform_sampling_ms']:.2f}", f"{r['crd_ms']:.2f}", f"{r['crd_uniform_ms']:.2f}"]
                    for r in crd_rows]))


def print_models(model_rows, model_skip):
    print()
    print("## 3. The loss next to the networks (forward, no_grad, eval; losses forward+backward, C=100)")
    print()
    if model_skip:
        print(model_skip)
    if model_rows:
        print(md_table(["model", "B", "forward ms", "CKD ms", "CKD % of fwd", "MCLD ms", "MCLD % of fwd"],
                       [[r["model"], r["B"], f"{r['forward_ms']:.1f}", f"{r['ckd_ms']:.2f}",
                         f"{r['ckd_pct_of_forward']:.2f}", f"{r['mcld_ms']:.2f}", f"{r['mcld_pct_of_forward']:.2f}"]
                        for r in model_rows]))
        print()
        print("A training step also runs the student's backward (about 2x its forward), so the loss's share of a")
        print("step is smaller still.")


if __name__ == "__main__":
    main()
