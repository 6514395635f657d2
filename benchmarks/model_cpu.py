"""CPU benchmark: our runtime vs transformers on the same tiny checkpoint (fp32), batch 1, 8, 32.

Prefill: one forward over B prompts of 64 tokens (ours packed, transformers [B, 64]).
Decode: 32 greedy tokens after that prefill; tokens/s of the decode steps only. Table printed last.
"""

from __future__ import annotations

import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime.generate import Generator
from runtime.kv_cache import prefill_metadata
from runtime.loader import load_model
from runtime.sampling import SamplingParams
from runtime.tiny import make_tiny

PROMPT, NEW, BATCHES, REPEAT = 64, 32, (1, 8, 32), 3


class _StepClock:
    def __init__(self) -> None:
        self.stamps: list[float] = []

    def __call__(self, input_ids, scores):
        self.stamps.append(time.perf_counter())
        return scores


def best(fn, n: int = REPEAT) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> int:
    import transformers
    from transformers import AutoModelForCausalLM, LogitsProcessorList

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = make_tiny(Path(tmp) / "tiny", arch="v2", seed=0)
        ours = load_model(path)
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    V = ours.config.vocab_size
    rows = []
    with torch.inference_mode():
        for B in BATCHES:
            prompts = torch.randint(3, V, (B, PROMPT))
            # prefill
            lens = [PROMPT] * B
            meta = prefill_metadata(lens, lens, None, None)
            pos = torch.arange(PROMPT).repeat(B)
            last = torch.arange(1, B + 1) * PROMPT - 1
            ours_pre = best(lambda p=prompts, m=meta, q=pos, la=last: ours(p.reshape(-1), q, m, None, la))
            hf_pre = best(lambda p=prompts: hf(p, logits_to_keep=1))
            # decode: ours through the generator (prefill time subtracted), transformers via step clock
            gen = Generator(ours, max_batch=B, max_model_len=PROMPT + NEW + 16)
            params = SamplingParams(max_new_tokens=NEW + 1, ignore_eos=True)
            plist = prompts.tolist()
            gen.generate(plist, SamplingParams(max_new_tokens=2, ignore_eos=True))
            t_total = best(lambda g=gen, p=plist, sp=params: g.generate(p, sp))
            t_pre = best(lambda g=gen, p=plist: g.generate(p, SamplingParams(max_new_tokens=1, ignore_eos=True)))
            ours_dec = B * NEW / (t_total - t_pre)
            kw = dict(do_sample=False, eos_token_id=None, pad_token_id=2, max_new_tokens=NEW + 1)
            kw["min_new_tokens"] = NEW + 1
            hf.generate(prompts, **{**kw, "max_new_tokens": 2, "min_new_tokens": 2})
            rates = []
            for _ in range(REPEAT):
                clock = _StepClock()
                hf.generate(prompts, logits_processor=LogitsProcessorList([clock]), **kw)
                rates.append(B * (len(clock.stamps) - 1) / (clock.stamps[-1] - clock.stamps[0]))
            hf_dec = max(rates)
            row = (B, B * PROMPT / ours_pre, B * PROMPT / hf_pre, ours_dec, hf_dec)
            print(
                "batch {}: prefill ours {:.0f} tok/s, transformers {:.0f}; decode ours {:.0f}, "
                "transformers {:.0f}".format(*row)
            )
            rows.append(row)
    print()
    print(
        f"CPU box ({torch.get_num_threads()} threads, {platform.processor() or platform.machine()}), "
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"Python {platform.python_version()}"
    )
    print(f"tiny v2 checkpoint (fp32, hidden 64, 4 layers, 8 experts top-2); prompt {PROMPT}, {NEW} new tokens")
    print()
    print(
        "| batch | prefill ours tok/s | prefill transformers tok/s | ratio | decode ours tok/s | "
        "decode transformers tok/s | ratio |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for B, po, ph, do, dh in rows:
        print(f"| {B} | {po:,.0f} | {ph:,.0f} | {po / ph:.1f}× | {do:,.0f} | {dh:,.0f} | {do / dh:.1f}× |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
