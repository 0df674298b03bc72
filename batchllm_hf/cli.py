"""The `batchllm-hf` command."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="batchllm-hf", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run the shared-prefix job on an embedded random model and prompts")
    demo.add_argument("--max-new-tokens", type=int, default=16)
    demo.add_argument("--seed", type=int, default=0)
    run = commands.add_parser("run", help="generate for a whole .jsonl/.parquet/.csv file with a local model")
    run.add_argument("--model", required=True, help="local model folder (from_pretrained)")
    run.add_argument("--data", required=True, help="input file: .jsonl, .parquet or .csv")
    run.add_argument("--prompt-column", default="prompt")
    run.add_argument("--output", required=True, help="output file: .jsonl, .parquet or .csv")
    run.add_argument("--max-new-tokens", type=int, default=128)
    run.add_argument("--temperature", type=float, default=None, help="sample at this temperature (default: greedy)")
    run.add_argument("--seed", type=int, default=None)
    run.add_argument("--resume", action="store_true", help="skip rows finished by an earlier, interrupted run")
    commands.add_parser("bench", help="benchmarks on the GPU (see `batchllm-hf bench --help`)", add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "demo":
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        from .demo import run_demo

        return 0 if run_demo(max_new_tokens=args.max_new_tokens, seed=args.seed) else 1
    if args.command == "run":
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        from .run_job import run_job

        run_job(args.model, args.data, args.prompt_column, args.output, max_new_tokens=args.max_new_tokens,
                temperature=args.temperature, seed=args.seed, resume=args.resume)
        return 0
    from .bench import main as bench_main

    return bench_main(rest)


if __name__ == "__main__":
    sys.exit(main())
