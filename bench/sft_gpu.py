"""Benchmark: LoRA / QLoRA training throughput and peak memory on one GPU (not a test).

    python bench/sft_gpu.py [--models gemma3-4b,gemma3-12b] [--modes lora,qlora] [--seq-len 512] [--batch 4]
                            [--steps 8] [--out FILE]
    python bench/sft_gpu.py --smoke      # CPU, random:gemma3-tiny, lora only: checks the script itself

Per (model, mode), in one process, one after the other:
- `lora`: the random-weight Gemma 3 (`random:<model>`) in bfloat16 through the project's loader, the
  product's adapter (`stage1_core.train.sft.attach_lora`, configs/sft.yaml's LoRA: r 16, alpha 32, all
  linear layers), bf16 autocast.
- `qlora`: the same random weights saved to a local folder, loaded back through the project's
  loader with `model.quantize: 4bit` (bitsandbytes nf4, double quant, bf16 compute), k-bit
  preparation with gradient checkpointing, the same adapter.
Each step is a forward + backward + AdamW step on `batch` rows of `seq_len` random tokens (loss on
every token); 2 warm-up steps, then `steps` timed steps (synchronised). tokens/s = batch x seq_len x
steps / seconds. Peak memory: torch.cuda.max_memory_allocated over load + training.

Writes `bench/results/sft_gpu-<date>.json`: {"records": [{model, mode, seq_len, batch, steps,
tokens_per_s, step_ms, peak_mem_gb, trainable_params, gradient_checkpointing, ...}]}, rewritten
after each record.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
for k, v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "USE_HUB_KERNELS": "0", "DO_NOT_TRACK": "1"}.items():
    os.environ.setdefault(k, v)


def run_one(model: str, mode: str, seq_len: int, batch: int, steps: int, device: str) -> dict:
    import torch

    from stage1_core.infra.config import ModelConfig
    from stage1_core.model import load_hf_model, resolve_model
    from stage1_core.train.sft import SFTSettings, attach_lora

    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    dtype = "bfloat16" if cuda else "float32"
    t0 = time.perf_counter()
    cfg = ModelConfig(id=f"random:{model}", device=device, dtype=dtype)
    m, tok = load_hf_model(resolve_model(cfg), cfg, device)
    tmp = None
    if mode == "qlora":
        tmp = Path(tempfile.mkdtemp(prefix="sft-bench-", dir=os.environ.get("BENCH_TMP")))
        m.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        del m
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        qcfg = ModelConfig(id=str(tmp), device=device, dtype="bfloat16", quantize="4bit")
        m, tok = load_hf_model(resolve_model(qcfg), qcfg, device)
    load_s = time.perf_counter() - t0
    settings = SFTSettings(gradient_checkpointing=mode == "qlora")
    m = attach_lora(m, settings, quantized=mode == "qlora")
    m.train()
    trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=2e-4)
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(10, 200_000, (batch, seq_len), generator=g).to(device)

    def step() -> float:
        with torch.autocast(device_type="cuda" if cuda else "cpu", dtype=torch.bfloat16, enabled=cuda):
            loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    for _ in range(2):
        step()
    if cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    losses = [step() for _ in range(steps)]
    if cuda:
        torch.cuda.synchronize()
    secs = time.perf_counter() - t
    rec = {"model": model, "mode": mode, "seq_len": seq_len, "batch": batch, "steps": steps,
           "tokens_per_s": round(batch * seq_len * steps / secs, 1), "step_ms": round(1000 * secs / steps, 1),
           "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2) if cuda else None,
           "trainable_params": trainable, "gradient_checkpointing": settings.gradient_checkpointing,
           "lora": settings.lora.model_dump(), "load_seconds": round(load_s, 1), "loss_first_last": [losses[0], losses[-1]],
           "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__}
    del m, opt
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)
    return rec


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="gemma3-4b,gemma3-12b")
    ap.add_argument("--modes", default="lora,qlora")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / f"sft_gpu-{dt.date.today().isoformat()}.json"))
    a = ap.parse_args()
    device = "cpu" if a.smoke else "cuda"
    models = ["gemma3-tiny"] if a.smoke else a.models.split(",")
    modes = ["lora"] if a.smoke else a.modes.split(",")
    out = Path(a.out)
    records = []
    for model in models:
        for mode in modes:
            try:
                rec = run_one(model, mode, a.seq_len if not a.smoke else 64, a.batch, a.steps if not a.smoke else 2, device)
            except Exception as e:  # noqa: BLE001 - one failed record must not lose the others
                rec = {"model": model, "mode": mode, "error": f"{type(e).__name__}: {e}",
                       "traceback": traceback.format_exc()[-2000:]}
            records.append(rec)
            print(json.dumps(rec), flush=True)
            if not a.smoke:
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps({"benchmark": "sft_gpu", "date": dt.date.today().isoformat(),
                                           "records": records}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
