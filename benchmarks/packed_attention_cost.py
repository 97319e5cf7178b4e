"""One tiny trial trained packed and unpacked on the same rows: the losses must agree, and the time says what packing
costs where attention sees a whole packed row (transformers' sdpa path masks a block-diagonal T x T attention).

    python benchmarks/packed_attention_cost.py [--dataset ultrachat] [--steps 20]

Prints JSON: per arm train_s, tokens/s, train_loss and eval_loss; `losses_agree`.
"""

from __future__ import annotations

import argparse
import json
import math


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="ultrachat")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()

    import torch

    from tune_lfm.config import TrialConfig
    from tune_lfm.spaces import scaled_config
    from tune_lfm.trial import run_trial

    torch.set_num_threads(1)  # as a tiny trial runs in a sweep
    config = scaled_config(TrialConfig(dataset=args.dataset, lora_targets="hub_all"), "tiny")
    config = config.replace(hub_layers=[0, 1, 2, 4], max_steps=args.steps)
    arms = {}
    for packing in (True, False):
        result = run_trial(config.replace(packing=packing), log=lambda line: None)
        arms["packed" if packing else "padded"] = {key: result[key] for key in (
            "train_s", "tokens_trained", "tokens_per_s", "train_loss", "eval_loss", "packing_used")}
    agree = math.isclose(arms["packed"]["train_loss"], arms["padded"]["train_loss"], rel_tol=1e-4)
    print(json.dumps({"dataset": args.dataset, "steps": args.steps, "arms": arms, "losses_agree": agree,
                      "packed_over_padded_time": arms["packed"]["train_s"] / arms["padded"]["train_s"]}, indent=2))


if __name__ == "__main__":
    main()
