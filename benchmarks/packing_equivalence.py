"""Leak-free packing checked on the device that trains: packed logits against each conversation alone.

tests/test_packing.py proves the property on the CPU in fp32; this script repeats it where the GPU kernels differ
(bf16, PyTorch's varlen flash attention), on any LFM2 model (random weights from the config when none are stored):

- `attention_kernel`: `tune_lfm.packing.varlen_attention_forward` against SDPA with a block-diagonal causal mask on
  random query/key/value (outputs and input gradients), and which path it took (the varlen flash kernel on CUDA in
  bf16, one SDPA per conversation elsewhere);
- `models`: for each precision x attention implementation, the largest |logit| difference between the packed row
  and the conversations run alone (`fixed`), and the same with `seq_idx` withheld (`leaky`, the error transformers
  makes without the fix); `ok` when `fixed` is small both absolutely and next to `leaky`.

Prints one JSON object; `--output` also writes it to a file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.throughput import load_model_and_tokenizer  # noqa: E402
from tune_lfm import packing  # noqa: E402
from tune_lfm.teardown import skip_collection_at_exit  # noqa: E402

RELATIVE_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 5e-2}
"""Largest |logit| difference accepted between packed and alone, as a share of the largest |logit|: packed rows and
single conversations run different kernel shapes (and cuDNN may use TF32 for fp32 convolutions), bf16 keeps about
three significant digits."""


def attention_kernel_check(device) -> dict:
    """varlen_attention_forward against masked SDPA on the same packed random inputs (GQA 16 -> 8 heads, dim 64)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    lengths = [300, 7, 1024, 129, 1]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    total = sum(lengths)
    seq = torch.repeat_interleave(torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device))
    allowed = (seq[:, None] == seq[None, :]) & torch.ones(total, total, dtype=torch.bool, device=device).tril()
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 2, True
    generator = torch.Generator(device=device).manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # off CUDA: one SDPA per conversation
    tensors = [torch.randn(1, heads, total, 64, device=device, dtype=dtype, generator=generator).requires_grad_()
               for heads in (16, 8, 8)]
    scale = 64**-0.5
    fast, _ = packing.varlen_attention_forward(module, *tensors, None, scaling=scale, cu_seq_lens_q=cu,
                                               max_length_q=max(lengths))
    fast_grads = torch.autograd.grad(fast.float().square().sum(), tensors)
    reference, _ = sdpa_attention_forward(module, *tensors, allowed[None, None], scaling=scale)
    reference_grads = torch.autograd.grad(reference.float().square().sum(), tensors)
    kernel = device.type == "cuda" and packing._varlen_kernel(64, scale) is not None
    return {"path": "varlen flash kernel" if kernel else "one SDPA per conversation", "dtype": str(dtype),
            "max_output_diff": (fast - reference).abs().max().item(),
            "max_grad_diff": max((a - b).abs().max().item() for a, b in zip(fast_grads, reference_grads)),
            "output_scale": reference.abs().max().item()}


def model_check(name: str, dtype, attention: str, device, lengths: list[int]) -> dict:
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    model, _, weights = load_model_and_tokenizer(name, dtype, device)
    model.set_attn_implementation(attention)
    model.eval()
    generator = torch.Generator().manual_seed(1)
    conversations = [torch.randint(1, model.config.vocab_size, (n,), generator=generator).tolist() for n in lengths]
    collator = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    batch = collator([{"input_ids": c} for c in conversations])
    inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        alone = torch.cat([model(input_ids=torch.tensor([c], device=device), use_cache=False).logits[0]
                           for c in conversations]).float()
        scale = alone.abs().max().item()
        fixed = (model(**inputs, use_cache=False).logits[0].float() - alone).abs().max().item()
        without_seq_idx = {k: v for k, v in inputs.items() if k != "seq_idx"}
        packing.disable_leak_free_packing()
        try:
            leaky = (model(**without_seq_idx, use_cache=False).logits[0].float() - alone).abs().max().item()
        finally:
            packing.enable_leak_free_packing()
    return {"precision": str(dtype), "attention": attention, "weights": weights, "fixed": fixed, "leaky": leaky,
            "logit_scale": scale, "ok": fixed <= RELATIVE_TOLERANCE[dtype] * scale and fixed < 0.2 * leaky}


def main(argv=None) -> int:
    skip_collection_at_exit()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-lfm2")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--lengths", default="300,7,1024,129,1,512", help="conversation lengths packed in one row")
    parser.add_argument("--output")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    packing.enable_leak_free_packing()
    lengths = [int(n) for n in args.lengths.split(",")]
    precisions = [torch.float32] + ([torch.bfloat16] if device.type == "cuda" else [])
    report = {"benchmark": "packing_equivalence", "model": args.model, "device": str(device),
              "torch": torch.__version__, "lengths": lengths, "attention_kernel": attention_kernel_check(device),
              "models": [model_check(args.model, dtype, attention, device, lengths)
                         for dtype in precisions for attention in ("sdpa", packing.VARLEN_ATTENTION)]}
    report["ok"] = all(row["ok"] for row in report["models"])
    text = json.dumps(report, indent=2)
    if args.output:
        Path(args.output).write_text(text)
    print(text)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
