"""GPU sanity check of the engine (not a test): tiny random models, engine greedy output vs plain HF generate
per prompt, with each attention backend available (fp32 and bf16). Prints agreement; exits 1 on fp32 mismatch.
Usage: python benchmarks/engine_gpu_check.py [fp32] [bf16]   (no argument: both)"""

import random
import sys

import torch
from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig

import batchllm_hf  # noqa: F401
from batchllm_hf.engine import Engine, EngineConfig
from batchllm_hf.engine import decode_graphs

decode_graphs.MIN_CAPTURE_STEPS = 0  # capture every size, however few steps it serves: this checks the graphs


def main():
    ok = True
    names = {"fp32": torch.float32, "bf16": torch.bfloat16}
    unknown = [a for a in sys.argv[1:] if a not in names]
    if unknown:
        raise SystemExit(f"unknown dtypes {unknown}; choose from {sorted(names)}")
    for dtype in [names[a] for a in sys.argv[1:]] or names.values():
        config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                             num_attention_heads=8, num_key_value_heads=2, head_dim=64, initializer_range=0.3,
                             eos_token_id=2, pad_token_id=0)
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa").eval()
        rng = random.Random(0)
        prompts = []
        for prefix_len, members in ((200, 8), (70, 5), (0, 4)):
            prefix = [rng.randrange(3, 512) for _ in range(prefix_len)]
            prompts += [prefix + [rng.randrange(3, 512) for _ in range(rng.randint(1, 40))] for _ in range(members)]
        rng.shuffle(prompts)
        gen = GenerationConfig(max_new_tokens=12, min_new_tokens=12, do_sample=False, eos_token_id=2, pad_token_id=0)
        ref = []
        for p in prompts:
            ids = torch.tensor([p], device="cuda")
            ref.append(model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gen)[0, len(p):].tolist())
        # page_size None: the engine's default on a GPU (64: prefill chunks and CUDA-graph decode steps take TMA
        # key loads with page ids prefetched in bf16; fp32 keeps pointer loads); the other rows keep pages of 16
        for backend, shared, graphs, page_size in (("triton", True, True, None), ("triton", False, True, 16),
                                                   ("triton", True, False, 16), ("sdpa", True, False, 16)):
            try:
                engine = Engine(model, EngineConfig(page_size=page_size, num_pages=512, attention_backend=backend,
                                                    use_shared_prefix=shared, max_batch_tokens=256,
                                                    cuda_graphs=graphs))
                out = engine.generate(prompts, gen)
                if graphs:
                    g = engine.decode_graphs
                    print(f"  graphs enabled={g.enabled} captured={sorted(g.graphs)} ahead={g.ahead} "
                          f"skipped={g.skipped} error={g.error}")
            except Exception as error:
                print(f"{dtype} {backend} shared={shared}: ERROR {error!r}")
                ok = ok and dtype != torch.float32
                continue
            same = sum(o.token_ids == r for o, r in zip(out, ref))
            tokens = sum(a == b for o, r in zip(out, ref) for a, b in zip(o.token_ids, r))
            print(f"{dtype} {backend} shared={shared} graphs={graphs} pages={engine.config.page_size or 'default'}: "
                  f"{same}/{len(prompts)} prompts identical, "
                  f"{tokens}/{12 * len(prompts)} tokens")
            ok = ok and (same == len(prompts) or dtype != torch.float32)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
