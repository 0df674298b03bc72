"""Best-of-n sampling: n samples per prompt share their whole prompt (prefilled once), then a scorer picks one.

The scorer here is the mean log-probability the model gives its own sample (any function of the text
works: a reward model, unit tests, a regex). Seeded: the same seed gives the same samples whatever the
batch composition.

    python examples/best_of_n.py [--model PATH] [--n 8]
"""

import torch

from _common import load, parser
from batchllm_hf import BatchGenerator


@torch.no_grad()
def mean_logprob(model, prompt_ids, sample_ids):
    ids = torch.tensor([prompt_ids + sample_ids], device=model.device)
    logits = model(ids).logits[0, len(prompt_ids) - 1:-1].float()
    return logits.log_softmax(-1).gather(-1, ids[0, len(prompt_ids):, None]).mean().item()


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    model, tokenizer, word = load(args.model)
    prompts = [" ".join(word(i * 7 + j) for j in range(30)) for i in range(4)]
    generator = BatchGenerator(model, tokenizer)
    samples = generator.generate(prompts, do_sample=True, temperature=0.9, top_p=0.95, num_return_sequences=args.n,
                                 max_new_tokens=args.max_new_tokens, seed=args.seed, return_token_ids=True)
    print(generator.stats)
    best = []
    for prompt, candidates in zip(prompts, samples):
        prompt_ids = tokenizer(prompt).input_ids
        scores = [mean_logprob(model, prompt_ids, c) if c else float("-inf") for c in candidates]
        pick = max(range(len(candidates)), key=scores.__getitem__)
        best.append(tokenizer.decode(candidates[pick], skip_special_tokens=True))
        print(f"{len(candidates)} samples, best mean log-prob {scores[pick]:.3f}: {best[-1][:60]!r}")
    return best


if __name__ == "__main__":
    main()
