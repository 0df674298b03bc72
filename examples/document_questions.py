"""Many questions per document: every (document, question) row shares its document as a prompt prefix.

BatchGenerator.map groups the rows of the whole dataset by shared prefix, prefills each document once
and runs its questions together. Prints the sharing stats and a few answers.

    python examples/document_questions.py                  # tiny random model, CPU
    python examples/document_questions.py --model PATH     # a local model, GPU if present
"""

import random

import datasets
from transformers import GenerationConfig

from _common import load, parser
from batchllm_hf import BatchGenerator


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--documents", type=int, default=4)
    p.add_argument("--questions", type=int, default=8)
    p.add_argument("--document-words", type=int, default=200)
    p.add_argument("--max-new-tokens", type=int, default=16)
    args = p.parse_args(argv)
    model, tokenizer, word = load(args.model)
    rng = random.Random(0)
    rows = []
    for d in range(args.documents):
        document = " ".join(word(rng.randrange(1000)) for _ in range(args.document_words))
        for q in range(args.questions):
            question = " ".join(word(rng.randrange(1000)) for _ in range(rng.randint(4, 12)))
            rows.append({"document": d, "prompt": f"{document} {question}"})
    rng.shuffle(rows)
    ds = datasets.Dataset.from_list(rows)
    generator = BatchGenerator(model, tokenizer)
    out = generator.map(ds, generation_config=GenerationConfig(max_new_tokens=args.max_new_tokens, do_sample=False))
    print(generator.stats)
    for row in out.select(range(3)):
        print(f"document {row['document']}: ...{row['prompt'][-40:]!r} -> {row['generation'][:60]!r}")
    return out


if __name__ == "__main__":
    main()
