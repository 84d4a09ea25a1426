"""Model benchmark: data loading, training throughput, and inference against the compute bound.

    .venv/bin/python benchmarks/bench_model.py [--model PATH] [--data-root DIR] [--steps 30] [--out FILE]
    python benchmarks/bench_model.py --device cuda --sections training     # the training table on a GPU

1. **Data loading** of the real set (``hippo.data.datamodule.load_cases``): serial against a process
   pool of ``os.cpu_count()`` workers -> cases/s and the ratio.
2. **Training throughput** (slices/s) of the shipped model's network on the real slices with its
   augmentation, for ``32-true``, ``16-mixed`` and ``bf16-mixed`` through Lightning, and the same
   model, data, loss and optimiser in a bare PyTorch loop -> Lightning's overhead as a ratio.
   On a CPU Lightning runs ``16-mixed`` as bfloat16 (float16 autocast is emulated there and very
   slow); the bare loop also times true float16 autocast to show why. ``--device cuda`` runs this
   section on the GPU (Lightning ``accelerator="gpu"``; the bare loop with float16 autocast and a
   ``GradScaler`` for ``16-mixed``, as Lightning does there), timed between CUDA synchronisations.
3. **Inference**: the network's FLOPs per slice (``torch.utils.flop_counter``) and this machine's
   float32 matmul peak (a timed 1024x1024 matmul) give a compute bound in slices/s; the measured
   slices/s of each variant (``no_grad`` eager = before, ``inference_mode``, channels-last, 1 vs all
   threads, ``torch.compile``, bfloat16) are printed as a fraction of that bound and as a ratio
   against the baseline, with the per-study latency of ``InferenceAgent.segment`` on real volumes.

Per-stage deploy latency (read, infer, report, send), batch throughput for 1/2/4 workers and peak
memory are measured by ``benchmarks/bench_deploy.py``; ``make bench`` runs both. Every figure is
also written as JSON (default ``outputs/benchmarks/model.json``). Without the real data the script
uses the synthetic generator and says so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_deploy import CpuMeter, log, rss_mib  # noqa: E402  (benchmarks/ is not a package)

DEFAULT_MODEL = REPO / "src/hippo/weights/hippocampus_25d.pt"
DEFAULT_DATA = REPO.parent / "shared/data/Task04_Hippocampus"
DEFAULT_OUT = REPO / "outputs/benchmarks/model.json"
SECTIONS = ("loading", "training", "inference")


def timed(fn: Callable[[], Any], repeat: int, warmup: int = 1) -> list[float]:
    """Seconds of each of ``repeat`` calls of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


# ----------------------------------------------------------------------------------- 1. loading
def bench_loading(data_root: Path, cpus: int) -> tuple[dict[str, Any], list]:
    from hippo.data.datamodule import load_cases
    from hippo.data.nifti import find_pairs

    pairs, _ = find_pairs(data_root)
    t = time.perf_counter()
    cases, errors = load_cases(pairs, workers=1)
    serial = time.perf_counter() - t
    workers = max(2, cpus)
    t = time.perf_counter()
    cases_pool, _ = load_cases(pairs, workers=workers)
    pool = time.perf_counter() - t
    assert [c.name for c in cases] == [c.name for c in cases_pool], "pool and serial loaded different cases"
    res = {"cases": len(cases), "errors": len(errors), "serial_s": serial, "pool_s": pool, "pool_workers": workers,
           "serial_cases_per_s": len(cases) / serial, "pool_cases_per_s": len(cases) / pool, "ratio": serial / pool}
    log(f"{'serial':<22} {serial:7.2f} s  {res['serial_cases_per_s']:7.1f} cases/s   1.00x")
    log(f"{f'process pool ({workers})':<22} {pool:7.2f} s  {res['pool_cases_per_s']:7.1f} cases/s   {res['ratio']:.2f}x")
    return res, cases


# ---------------------------------------------------------------------------------- 2. training
def first_member(payload: dict[str, Any]) -> dict[str, Any]:
    """The single model, or the first member of an ensemble file (they share one architecture)."""
    return payload["members"][0] if "members" in payload else payload


def _net_and_data(payload: dict[str, Any], cases: list, batch_size: int):
    import torch

    from hippo.data.datamodule import SlicesDataset
    from hippo.preprocessing import pad_or_crop
    from hippo.infer import build_net

    payload = first_member(payload)
    pre = payload["preprocessing"]
    context = int(pre.get("context_slices", 0))
    images = [pad_or_crop(c.image, pre["patch_size"])[0] for c in cases]
    labels = [pad_or_crop(c.label, pre["patch_size"])[0] for c in cases]
    dataset = SlicesDataset(images, labels, context)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True)
    return (lambda: build_net(payload).train()), loader, len(dataset)


def _augmentation():
    from hippo.data.augment import SliceAugmentation

    return SliceAugmentation()


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def bench_bare_loop(make_net, loader, steps: int, warmup: int, autocast_dtype, device: str = "cpu") -> float:
    """Slices/s of a plain PyTorch loop: augmentation, forward, CE + soft Dice, backward, Adam
    (on ``device``; float16 on a GPU goes through a ``GradScaler`` as Lightning's 16-mixed does)."""
    import torch
    import torch.nn.functional as F

    from hippo.model.module import soft_dice_loss

    torch.manual_seed(0)
    net, aug = make_net().to(device), _augmentation().to(device)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler(device, enabled=device == "cuda" and autocast_dtype == torch.float16)
    n, t0 = 0, None
    it = iter(loader)
    for step in range(warmup + steps):
        if step == warmup:
            _sync(device)
            t0 = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        x, y = aug(batch["image"].to(device, non_blocking=True), batch["label"].to(device, non_blocking=True))
        with torch.autocast(device, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            logits = net(x)
        loss = F.cross_entropy(logits.float(), y) + soft_dice_loss(logits, y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        if step >= warmup:
            n += len(y)
    _sync(device)
    return n / (time.perf_counter() - t0)


def bench_lightning(make_net, loader, steps: int, warmup: int, precision: str,
                    device: str = "cpu") -> tuple[float, str]:
    """Slices/s of ``Trainer.fit`` on ``SegmentationModule`` (the project's training path) for
    ``steps`` batches after ``warmup``; returns the precision Lightning actually ran."""
    import functools
    import logging

    import lightning as L
    import torch

    from hippo.model.module import SegmentationModule

    class Clock(L.Callback):
        def __init__(self) -> None:
            self.t0, self.n = None, 0

        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
            if batch_idx == warmup:
                _sync(device)
                self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            if batch_idx >= warmup:
                self.n += len(batch["label"])
                if batch_idx == warmup + steps - 1:
                    _sync(device)
                self.t1 = time.perf_counter()

    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    torch.manual_seed(0)
    module = SegmentationModule(make_net(), optimizer=functools.partial(torch.optim.Adam, lr=1e-3),
                                scheduler=None, log_images_every_n_epochs=0, augmentation=_augmentation())
    clock = Clock()
    trainer = L.Trainer(accelerator="gpu" if device == "cuda" else "cpu", devices=1, precision=precision, max_epochs=1,
                        limit_train_batches=warmup + steps, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[clock])
    trainer.fit(module, train_dataloaders=loader)
    return clock.n / (clock.t1 - clock.t0), str(trainer.precision)


EMULATED = ("skipped: this CPU has no native bfloat16/float16 kernels (no AVX-512 BF16 / AMX), so "
            "half precision runs emulated, tens of times slower; --emulated-half times it anyway")


def native_half(device: str) -> bool:
    """Whether ``device`` runs bfloat16 natively (:func:`hippo.infer.resolve_precision`'s test)."""
    from hippo.infer import resolve_precision

    return resolve_precision("auto", device) == "bfloat16"


def bench_training(payload: dict[str, Any], cases: list, steps: int, batch_size: int,
                   device: str = "cpu", emulated_half: bool = False) -> dict[str, Any]:
    import torch

    make_net, loader, n_slices = _net_and_data(payload, cases, batch_size)
    warmup = 10   # oneDNN / cuDNN pick and cache kernels per precision in the first steps
    res: dict[str, Any] = {"device": device, "batch_size": batch_size, "steps": steps, "warmup": warmup,
                           "train_slices": n_slices, "lightning": {}, "bare": {}}
    if device == "cuda":
        res["gpu"] = torch.cuda.get_device_name(0)
    log(f"{'precision':<12} {'Lightning':>14} {'bare loop':>14} {'Lightning/bare':>15}   (slices/s, batch {batch_size}, {device})")
    # on a CPU Lightning runs 16-mixed as bfloat16; on a GPU as float16 with a GradScaler
    half = torch.float16 if device == "cuda" else torch.bfloat16
    bare_dtype = {"32-true": None, "16-mixed": half, "bf16-mixed": torch.bfloat16}
    bare_cache: dict[Any, float] = {}
    half_ok = emulated_half or native_half(device)
    res["half_precision"] = "native" if native_half(device) else ("emulated" if half_ok else EMULATED)
    for precision in ("32-true", "16-mixed", "bf16-mixed"):
        dtype = bare_dtype[precision]
        if dtype is not None and not half_ok:
            res["lightning"][precision] = {"skipped": EMULATED, "ran_as": "skipped"}
            res["bare"][precision] = {"skipped": EMULATED, "autocast": str(dtype)}
            log(f"{precision:<12} {'skipped':>14} {'skipped':>14}   (emulated on this CPU)")
            continue
        if dtype not in bare_cache:
            bench_bare_loop(make_net, loader, 1, warmup, dtype, device)          # warm this precision's kernels
            bare_cache[dtype] = bench_bare_loop(make_net, loader, steps, warmup, dtype, device)
        lit, ran = bench_lightning(make_net, loader, steps, warmup, precision, device)
        bare = bare_cache[dtype]
        res["lightning"][precision] = {"slices_per_s": lit, "ran_as": ran}
        res["bare"][precision] = {"slices_per_s": bare, "autocast": str(dtype)}
        log(f"{precision:<12} {lit:>14.1f} {bare:>14.1f} {lit / bare:>14.2f}x   (Lightning ran {ran})")
    if device == "cpu" and half_ok:
        fp16 = bench_bare_loop(make_net, loader, max(2, steps // 10), 1, torch.float16)
        res["bare"]["float16_autocast"] = {"slices_per_s": fp16}
        log(f"{'fp16 autocast':<12} {'':>14} {fp16:>14.1f}   (bare loop: why Lightning runs 16-mixed as bf16 on a CPU)")
    return res


# --------------------------------------------------------------------------------- 3. inference
def matmul_peak_gflops(n: int = 1024, repeat: int = 10) -> float:
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    best = min(timed(lambda: a @ b, repeat, warmup=3))
    return 2 * n ** 3 / best / 1e9


def flops_per_slice(net, channels: int, size: tuple[int, int]) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.rand(1, channels, *size)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(x)
    return float(counter.get_total_flops())


def bench_inference(model_path: Path, payload: dict[str, Any], cases: list, repeat: int,
                    compile_net: bool = True, emulated_half: bool = False) -> dict[str, Any]:
    import torch

    from hippo.preprocessing import pad_or_crop, with_neighbours
    from hippo.infer import InferenceAgent, build_net

    payload = first_member(payload)
    pre = payload["preprocessing"]
    context = int(pre.get("context_slices", 0))
    net = build_net(payload)
    channels = 2 * context + 1
    size = tuple(pre["patch_size"])
    flops = flops_per_slice(net, channels, size)
    threads = torch.get_num_threads()
    peak = matmul_peak_gflops()
    bound = peak * 1e9 / flops
    # the slices of one typical study (the first real volume), batched as deployment does
    volume = pad_or_crop(cases[0].image, size)[0]
    x = torch.from_numpy(np.ascontiguousarray(with_neighbours(volume, context)))
    n = x.shape[0]
    res: dict[str, Any] = {"flops_per_slice": flops, "matmul_peak_gflops": peak, "threads": threads,
                           "bound_slices_per_s": bound, "study_slices": n, "variants": {}}
    log(f"network: {flops / 1e6:.1f} MFLOP per {channels}x{size[0]}x{size[1]} slice; float32 matmul peak "
        f"{peak:.1f} GFLOP/s ({threads} threads) -> compute bound {bound:.0f} slices/s")

    def run_variant(name: str, fn: Callable[[], Any], setup: Callable[[], None] | None = None,
                    teardown: Callable[[], None] | None = None) -> None:
        if setup:
            setup()
        try:
            t = time.perf_counter()
            fn()                                    # first call (compile, allocator warm-up)
            first = time.perf_counter() - t
            seconds = statistics.median(timed(fn, repeat, warmup=1))
        finally:
            if teardown:
                teardown()
        res["variants"][name] = {"study_s": seconds, "slices_per_s": n / seconds, "first_call_s": first}

    eager = build_net(payload)

    def no_grad():
        with torch.no_grad():
            eager(x)

    def inference_mode():
        with torch.inference_mode():
            eager(x)

    cl_net = build_net(payload).to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)

    def channels_last():
        with torch.inference_mode():
            cl_net(x_cl)

    def bf16():
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            eager(x)

    run_variant("no_grad (before)", no_grad)
    run_variant("inference_mode", inference_mode)
    run_variant("inference_mode, 1 thread", inference_mode, lambda: torch.set_num_threads(1),
                lambda: torch.set_num_threads(threads))
    run_variant("channels_last", channels_last)
    if native_half("cpu") or emulated_half:
        run_variant("bfloat16 autocast", bf16)
    else:
        res["variants"]["bfloat16 autocast"] = {"skipped": EMULATED}
        log(f"bfloat16 autocast: {EMULATED}")
    try:
        if not compile_net:
            raise RuntimeError("skipped (--skip-compile)")
        compiled = torch.compile(build_net(payload))

        def compiled_fn():
            with torch.inference_mode():
                compiled(x)

        run_variant("torch.compile", compiled_fn)
    except Exception as exc:  # no C++ compiler, unsupported platform...
        res["variants"]["torch.compile"] = {"error": f"{type(exc).__name__}: {exc}"[:300]}

    base = res["variants"]["no_grad (before)"]["slices_per_s"]
    log(f"{'variant':<26} {'ms/study':>9} {'slices/s':>9} {'of bound':>9} {'vs before':>10} {'1st call':>9}"
        f"   ({n} slices per study, one batch)")
    for name, v in res["variants"].items():
        if "error" in v or "skipped" in v:
            log(f"{name:<26} " + (f"failed: {v['error']}" if "error" in v else "skipped (emulated on this CPU)"))
            continue
        v["fraction_of_bound"] = v["slices_per_s"] / bound
        v["ratio_vs_before"] = v["slices_per_s"] / base
        log(f"{name:<26} {v['study_s'] * 1e3:>9.1f} {v['slices_per_s']:>9.0f} {v['fraction_of_bound']:>8.0%} "
            f"{v['ratio_vs_before']:>9.2f}x {v['first_call_s'] * 1e3:>8.0f}ms")

    # what deployment runs: the shipped file through the agent, whole raw volumes (normalisation,
    # 2.5D stacking, every ensemble member, probability averaging, largest-component post-processing)
    volumes = [case.image * 1000.0 for case in cases[:20]]
    for label, threads in (("members one after another (default)", 1), ("members side by side", None)):
        agent = InferenceAgent.from_file(model_path, member_threads=threads)
        members = len(agent.members)
        agent.segment(volumes[0])
        lat = [timed(lambda: agent.segment(v), 1, warmup=0)[0] for v in volumes]
        res.setdefault("agent_study_ms", {})[label] = {
            "median": statistics.median(lat) * 1e3, "p90": float(np.percentile(lat, 90)) * 1e3,
            "studies": len(lat), "members": members, "member_threads": agent.member_threads}
    # the bound of a whole study: every member's slices along its own axis, each at that member's own
    # FLOPs per slice (members may differ in width), at the matmul peak (median over the volumes)
    member_flops = [flops_per_slice(m, 2 * int(p.get("context_slices", 0)) + 1, tuple(p.get("patch_size", size)))
                    for m, p in agent.members]
    res["member_mflops_per_slice"] = [f / 1e6 for f in member_flops]
    res["agent_bound_ms"] = statistics.median(
        sum(v.shape[int(p.get("slice_axis", 0))] * f for (_, p), f in zip(agent.members, member_flops))
        for v in volumes) / (peak * 1e9) * 1e3
    log(f"InferenceAgent.segment of the shipped file ({members} member(s)) on {len(volumes)} whole volumes "
        f"(normalise, 2.5D stack, members, average, largest component); members "
        f"{'/'.join(f'{f:.0f}' for f in res['member_mflops_per_slice'])} MFLOP per slice; "
        f"compute bound {res['agent_bound_ms']:.0f} ms:")
    base_ms = res["agent_study_ms"]["members one after another (default)"]["median"]
    for label, v in res["agent_study_ms"].items():
        log(f"  {label:<38} median {v['median']:7.1f} ms  p90 {v['p90']:7.1f} ms  {base_ms / v['median']:.2f}x "
            f"({v['member_threads']} member thread(s))")
    return res


# -------------------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="model file (default: the shipped model)")
    p.add_argument("--data-root", type=Path, default=DEFAULT_DATA, help=f"Decathlon Task04 root (default {DEFAULT_DATA})")
    p.add_argument("--steps", type=int, default=30, help="timed training steps per precision (default 30)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeat", type=int, default=10, help="timed inference repetitions (default 10)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--emulated-half", action="store_true",
                   help="time bfloat16/float16 also where the CPU only emulates them (very slow there)")
    p.add_argument("--skip-compile", action="store_true", help="leave out the torch.compile variant (~40 s to compile)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where the training section runs (default cpu; the others always run on the CPU)")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma-separated subset of {','.join(SECTIONS)} (default all; training and inference need loading)")
    args = p.parse_args(argv)
    args.sections = [x.strip() for x in args.sections.split(",") if x.strip()]
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown or not args.sections:
        p.error(f"--sections: unknown {unknown}; choose from {','.join(SECTIONS)}")
    if args.steps < 1 or args.repeat < 1 or args.batch_size < 1:
        p.error("--steps, --repeat and --batch-size must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from hippo.infer import load_model_file

    cpus = os.cpu_count() or 1
    if args.device == "cuda" and not torch.cuda.is_available():
        log("ERROR: --device cuda, but torch sees no CUDA device")
        return 2
    result: dict[str, Any] = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "args": {k: str(v) for k, v in vars(args).items()},
        "machine": {"cpu_count": cpus, "platform": platform.platform(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads(), "loadavg_start": os.getloadavg(),
                    "cuda": torch.cuda.is_available()},
    }
    payload = load_model_file(args.model)
    net_cfg = first_member(payload)["net"]["config"]
    log(f"== hippo model benchmark: {args.model.name} (UNet f={net_cfg['initial_filters']}, depth "
        f"{net_cfg['num_downs']}, {net_cfg['in_channels']} input channels), {cpus} CPU cores, torch {torch.__version__}")
    if os.getloadavg()[0] > 1.5:
        log(f"NOTE: 1-min load average {os.getloadavg()[0]:.2f}: other jobs are running; figures are from a shared machine")
    meter = CpuMeter()
    with tempfile.TemporaryDirectory() as tmp:
        data_root = args.data_root
        if not (data_root / "imagesTr").is_dir():
            from hippo.data.synthetic import generate_dataset

            log(f"data: SYNTHETIC ({data_root} not found)")
            data_root = generate_dataset(Path(tmp) / "synthetic", n_cases=60, seed=0)
            result["data"] = "synthetic"
        else:
            result["data"] = str(data_root)
        if "loading" in args.sections:
            log(f"\n== 1. data loading ({data_root})")
            result["loading"], cases = bench_loading(data_root, cpus)
        else:
            from hippo.data.datamodule import load_cases
            from hippo.data.nifti import find_pairs

            cases, _ = load_cases(find_pairs(data_root)[0], workers=max(2, cpus))
    if "training" in args.sections:
        log(f"\n== 2. training throughput on {args.device} (the shipped model's network, its augmentation, "
            "CE + soft Dice, Adam)")
        result["training"] = bench_training(payload, cases, args.steps, args.batch_size, args.device,
                                            args.emulated_half)
    if "inference" in args.sections:
        log("\n== 3. inference against the compute bound")
        result["inference"] = bench_inference(args.model, payload, cases, args.repeat, not args.skip_compile,
                                              emulated_half=args.emulated_half)
    result["cpu_use"] = meter.read()
    result["peak_rss"] = rss_mib()
    log(f"\npeak RSS {result['peak_rss']['self_mib']:.0f} MiB (this process), largest child "
        f"{result['peak_rss']['children_max_mib']:.0f} MiB; other jobs used "
        f"{(result['cpu_use'].get('others_cores') or 0):.2f} cores on average")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=str))
    log(f"figures: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
