#!/usr/bin/env python3
"""The PyTorch + peft anchor for `lathe bench train`: the same LoRA step on the same model.

Loads a Hugging Face folder (for example one written by `lathe bench synthetic-model`, which
Lathe trains on too), puts a LoRA of rank R on every linear projection of every layer
(q, k, v, o, gate, up, down: Lathe's `--targets all`), and times AdamW steps on a batch of
B sequences of S tokens, every token after the first a target, as `lathe bench train` does.
Prints one JSON object.

    python3 scripts/bench_peft.py --model DIR --device cpu --threads 2
    python3 scripts/bench_peft.py --model DIR --device cuda --dtype bf16
    python3 scripts/bench_peft.py --model DIR --device cpu --threads 2 --qlora

`--dtype bf16` keeps the frozen weights and activations in bf16 and the LoRA matrices in f32
(peft's default cast of adapter weights), the usual mixed-precision LoRA set-up. `--dtype
tf32` keeps everything in f32 but lets CUDA matrix products run on tensor cores as TF32
(`torch.backends.cuda.matmul.allow_tf32`), which is what Lathe's CUDA backend does with f32:
the like-for-like anchor for `lathe bench train --device cuda`.

`--qlora` is the QLoRA recipe as the QLoRA paper and peft's guide set it up: every frozen
projection of the layers stored by bitsandbytes in 4 bits (NF4 with double quantization,
computed in the `--dtype`), `prepare_model_for_kbit_training` (gradient checkpointing,
norms and head in f32), then the same LoRA: the anchor for `lathe bench train --qlora`, whose
projections are 4-bit blocks too (Q4_0) and whose backward pass recomputes each layer.

Needs torch, transformers and peft (`pip install torch transformers peft`), and bitsandbytes
for `--qlora` (0.50 runs its 4-bit layers on the CPU).
"""

import argparse
import json
import time


def rss_peak_mib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="a Hugging Face model folder")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--dtype", default="f32", choices=["f32", "tf32", "bf16"])
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: PyTorch's default)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5, help="measured steps, after one warm-up step")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--qlora", action="store_true", help="4-bit frozen projections (bitsandbytes NF4), gradient checkpointing")
    ap.add_argument("--gradient-checkpointing", action="store_true", help="recompute each layer in the backward pass")
    a = ap.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    # PyTorch multiplies f32 in full f32 unless told otherwise.
    torch.backends.cuda.matmul.allow_tf32 = a.dtype == "tf32"
    torch.backends.cudnn.allow_tf32 = a.dtype == "tf32"
    dtype = {"f32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    device = torch.device(a.device)
    if a.qlora:
        from peft import prepare_model_for_kbit_training
        from transformers import BitsAndBytesConfig

        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
        model = AutoModelForCausalLM.from_pretrained(a.model, torch_dtype=dtype, quantization_config=quant, device_map={"": device})
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    else:
        model = AutoModelForCausalLM.from_pretrained(a.model, torch_dtype=dtype).to(device)
        if a.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
    # A 4-bit weight is a packed byte tensor; its quantization state knows the real shape.
    params = sum(p.quant_state.shape.numel() if getattr(p, "quant_state", None) else p.numel() for p in model.parameters())
    lora = LoraConfig(
        r=a.rank,
        lora_alpha=2 * a.rank,
        lora_dropout=0.1,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (a.batch, a.seq), device=device)

    def step():
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    cuda = device.type == "cuda"
    step()  # warm-up: allocations, kernel selection
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        # Measure the training's own peak, not the loading's (Linux: `5` resets VmHWM).
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass
    t = time.perf_counter()
    for _ in range(a.steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    step_s = (time.perf_counter() - t) / a.steps
    # On a GPU, what the caching allocator reserved from the driver: the like of the pool
    # pages Lathe reports (`gpu_reserved_mib`); what tensors held at most is beside it.
    peak = torch.cuda.max_memory_reserved() / 2**20 if cuda else rss_peak_mib()
    allocated = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    print(json.dumps({
        "anchor": f"torch {torch.__version__} + peft",
        "model": a.model,
        "device": a.device,
        "dtype": a.dtype,
        "qlora": a.qlora,
        "gradient_checkpointing": a.gradient_checkpointing or a.qlora,
        "threads": torch.get_num_threads(),
        "batch": a.batch,
        "seq": a.seq,
        "rank": a.rank,
        "params": params,
        "trainable_params": sum(p.numel() for p in trainable),
        "step_s": step_s,
        "tokens_per_s": a.batch * a.seq / step_s,
        "peak_mib": peak,
        "peak_kind": "cuda max_memory_reserved" if cuda else "VmHWM while training",
        "peak_allocated_mib": allocated,
        "gpu": torch.cuda.get_device_name(device) if cuda else None,
    }))


if __name__ == "__main__":
    main()
