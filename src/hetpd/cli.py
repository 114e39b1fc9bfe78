"""Command line: ``hetpd generate`` and ``hetpd import-gguf``."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

DEFAULT_CHAT = "What is the capital of France? Answer in one sentence."


def _engine_args(parser: argparse.ArgumentParser, prefix: str = "", help_role: str = "") -> None:
    parser.add_argument(f"--{prefix}dtype", default="float32", choices=["float32", "bfloat16"],
                        help=f"weight and activation dtype{help_role}")
    parser.add_argument(f"--{prefix}quantization", default=None, choices=["int8"],
                        help=f"int8 weight-only quantisation{help_role}")
    parser.add_argument(f"--{prefix}kv-cache-dtype", default="auto",
                        choices=["auto", "float32", "bfloat16", "float16", "int8", "fp8_e4m3", "fp8"],
                        help=f"KV cache element type{help_role} (auto: same as --{prefix}dtype)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hetpd", description="Heterogeneous prefill/decode LLM serving and planning")
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="generate text with a local engine (or an in-process prefill/decode pair)")
    gen.add_argument("--model", default=None, help="HF-format model folder (default: embedded SmolLM2-135M-Instruct)")
    gen.add_argument("--prompt", action="append", default=[], help="raw text prompt (repeatable)")
    gen.add_argument("--chat", action="append", default=[], help="user message, rendered with the chat template (repeatable)")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=-1)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--device", default="cpu")
    gen.add_argument("--block-size", type=int, default=16)
    _engine_args(gen)
    gen.add_argument("--disaggregated", action="store_true",
                     help="run a prefill engine and a decode engine in this process, handing KV across as bytes")
    _engine_args(gen, "decode-", " of the decode engine with --disaggregated")

    imp = commands.add_parser("import-gguf", help="convert a GGUF checkpoint into an HF-format folder")
    imp.add_argument("gguf_file", type=Path)
    imp.add_argument("out_dir", type=Path)

    srv = commands.add_parser("serve", help="serve an OpenAI-compatible API with prefill and decode workers")
    srv.add_argument("--config", type=Path, default=None,
                     help="deployment YAML; default: 1 prefill (fp32) + 1 decode (bf16, int8 KV) of the embedded model")
    srv.add_argument("--port", type=int, default=None, help="HTTP port (overrides the file; 0 = any free port)")
    srv.add_argument("--sample-request", default=None, metavar="TEXT",
                     help="send one chat request through the deployment, print the answer and its trace, then stop")
    srv.add_argument("--step-trace", type=Path, default=None, metavar="DIR",
                     help="each worker appends its engine steps (work, wall and CPU seconds) to DIR/<worker>.jsonl; "
                          "`hetpd profile --served-steps DIR` fits the planner's step model to them")

    commands.add_parser("worker", help="run one worker that joins a running router (see `hetpd worker --help`)",
                        add_help=False)

    commands.add_parser("profile", help="measure this machine and the engine; write a calibration file for plans",
                        add_help=False)
    commands.add_parser("plan", help="search heterogeneous placements for a scenario (see `hetpd plan --help`)",
                        add_help=False)
    commands.add_parser("bench", help="load-test any OpenAI-compatible server (see `hetpd bench --help`)",
                        add_help=False)

    chat = commands.add_parser("chat", help="chat with a running server from the terminal (streams the answers)")
    chat.add_argument("--url", default="http://127.0.0.1:8000")
    chat.add_argument("--api-key", default=None)
    chat.add_argument("--model", default=None, help="default: the server's first model")
    chat.add_argument("--max-tokens", type=int, default=256)
    chat.add_argument("--temperature", type=float, default=0.7)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["profile"]:
        from hetpd.plan.profile import main as profile_main

        return profile_main(argv[1:])
    if argv[:1] == ["plan"]:
        from hetpd.plan.cli import main as plan_main

        return plan_main(argv[1:])
    if argv[:1] == ["bench"]:
        from hetpd.bench.cli import main as bench_main

        return bench_main(argv[1:])
    if argv[:1] == ["worker"]:
        from hetpd.serve.worker import main as worker_main

        worker_main(argv[1:])
        return 0
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            return _generate(args)
        if args.command == "import-gguf":
            return _import_gguf(args)
        if args.command == "serve":
            return _serve(args)
        if args.command == "chat":
            from hetpd.serve.chat_client import run

            return run(args.url, args.api_key, args.model, args.max_tokens, args.temperature)
    except (ValueError, OSError) as error:
        print(f"hetpd: error: {error}", file=sys.stderr)
        return 2
    return 1


def _serve(args: argparse.Namespace) -> int:
    import asyncio

    from hetpd.serve.deploy import default_deployment, load_deployment
    from hetpd.serve.launcher import serve

    deploy = load_deployment(args.config) if args.config else default_deployment()
    if args.step_trace is not None:
        from hetpd.core.step_work import STEP_TRACE_ENV

        args.step_trace.mkdir(parents=True, exist_ok=True)
        os.environ[STEP_TRACE_ENV] = str(args.step_trace.resolve())  # the workers inherit it
    port = args.port if args.port is not None else (0 if args.sample_request is not None else None)
    try:
        return asyncio.run(serve(deploy, args.sample_request, port))
    except KeyboardInterrupt:
        return 0


def _import_gguf(args: argparse.Namespace) -> int:
    from hetpd.models.gguf_import import import_gguf

    result = import_gguf(args.gguf_file, args.out_dir, progress=lambda line: print(line, file=sys.stderr))
    print(f"wrote {result.out_dir} ({result.architecture}, {result.num_tensors} tensors)")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from hetpd.engine.config import EngineConfig
    from hetpd.engine.disaggregated import DisaggregatedPair
    from hetpd.engine.engine import Engine
    from hetpd.llm import LLM
    from hetpd.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, stop=tuple(args.stop))
    chats = args.chat or ([] if args.prompt else [DEFAULT_CHAT])
    common = dict(model=args.model, device=args.device, block_size=args.block_size)
    print(f"loading {args.model or 'embedded SmolLM2-135M-Instruct'} ...", file=sys.stderr, flush=True)
    started = time.monotonic()
    if not args.disaggregated:
        llm = LLM(**common, dtype=args.dtype, quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype)
        tokenizer = llm.engine.tokenizer
        print(f"loaded in {time.monotonic() - started:.1f}s; dtype={args.dtype} kv={llm.engine.kv_cache.codec.name}",
              file=sys.stderr)
        started = time.monotonic()
        outputs = llm.generate(args.prompt, params) if args.prompt else []
        outputs += llm.chat([[{"role": "user", "content": c}] for c in chats], params) if chats else []
        handoff_note = ""
    else:
        prefill = Engine.from_config(EngineConfig(**common, role="prefill", dtype=args.dtype,
                                                  quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype))
        decode = Engine.from_config(EngineConfig(**common, role="decode", dtype=args.decode_dtype,
                                                 quantization=args.decode_quantization,
                                                 kv_cache_dtype=args.decode_kv_cache_dtype))
        tokenizer = prefill.tokenizer
        assert tokenizer is not None, "the model folder has no tokenizer"
        texts = list(args.prompt) + [tokenizer.apply_chat_template([{"role": "user", "content": c}]) for c in chats]
        token_ids = [tokenizer.encode(t) for t in args.prompt]
        token_ids += [tokenizer.encode_chat([{"role": "user", "content": c}]) for c in chats]
        print(f"loaded in {time.monotonic() - started:.1f}s", file=sys.stderr)
        started = time.monotonic()
        result = DisaggregatedPair(prefill, decode).generate(token_ids, params, texts)
        outputs = result.outputs
        h = result.handoffs
        handoff_note = (f"\nKV handoffs: {h.num_handoffs}, {h.bytes_moved / 1e6:.2f} MB, "
                        f"{h.producer_kv_dtype} -> {h.consumer_kv_dtype}: {h.plan.verdict.kind.value}, "
                        f"conversion site: {h.plan.site}")
    elapsed = time.monotonic() - started
    generated = sum(len(o.token_ids) for o in outputs)
    for output in outputs:
        print(f"\n--- prompt ---\n{output.prompt}")
        print(f"--- completion ({len(output.token_ids)} tokens, finish_reason={output.outputs[0].finish_reason}) ---")
        print(output.text)
    print(f"\n{generated} tokens in {elapsed:.2f}s ({generated / max(elapsed, 1e-9):.1f} tok/s){handoff_note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
