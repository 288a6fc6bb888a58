"""`tuneoff serve`: load the base once and the adapters on it, then serve HTTP until stopped.

Serving is not a pipeline stage, so its settings are command-line flags, not params.yaml keys.
torch and the web stack are imported only when the server starts: `tuneoff --help` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import socket
from dataclasses import dataclass
from pathlib import Path

from tuneoff.core.errors import TuneoffError
from tuneoff.serving.catalog import (
    AdapterSpec,
    adapter_method,
    check_adapter_dir,
    check_name,
    from_registry,
    parse_adapter_arg,
)

log = logging.getLogger("tuneoff.serve")


@dataclass(frozen=True)
class ServeOptions:
    base: Path
    base_name: str
    registry: Path | None  # None: ./registry if it exists and no --adapter is given
    stage: str
    adapters: tuple[str, ...]  # NAME=PATH
    adapter_roots: tuple[Path, ...]
    max_adapters: int
    max_batch_size: int
    batch_wait_ms: float
    max_new_tokens: int
    max_queue: int
    max_body_bytes: int
    max_prompt_chars: int
    max_lora_rank: int
    host: str
    port: int
    device: str
    dtype: str
    threads: int


def catalog(options: ServeOptions) -> tuple[list[AdapterSpec], dict[str, str]]:
    """The adapters to serve (the registry's, then --adapter's), checked, and the refused models."""
    entries, refused = [], {}
    registry = options.registry
    if registry is None and not options.adapters and (Path("registry") / "registry.json").is_file():
        registry = Path("registry")
    if registry is not None:
        entries, refused = from_registry(registry, options.stage, options.base)
    entries += [(*parse_adapter_arg(arg), None, "--adapter") for arg in options.adapters]
    specs, seen = [], set()
    for name, path, method, source in entries:
        check_name(name, options.base_name)
        if name in seen:
            raise TuneoffError(f"adapter name {name!r} is given twice")
        seen.add(name)
        folder = check_adapter_dir(path)
        specs.append(AdapterSpec(name, folder, method or adapter_method(folder), source))
    return specs, refused


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `tuneoff serve` flags."""
    parser.add_argument("--base", type=Path, default=Path("models/base"),
                        help="the base model folder (default: models/base); a full fine-tune serves this way too")
    parser.add_argument("--base-name", default="base", help="the `model` name that means the base, no adapter")
    parser.add_argument("--registry", type=Path, help="serve each model's adapter registered in this folder "
                        "(default: ./registry when it exists and no --adapter is given)")
    parser.add_argument("--stage", choices=["production", "staging"], default="production",
                        help="which registered version of each model (default: production)")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                        help="serve the PEFT LoRA adapter folder PATH as model NAME (repeatable)")
    parser.add_argument("--adapter-root", action="append", type=Path, metavar="DIR",
                        help="folders the admin endpoint may load adapters from (repeatable; default: the current one)")
    parser.add_argument("--max-adapters", type=int, default=8,
                        help="adapters resident at once; the least recently used is unloaded (default: 8)")
    parser.add_argument("--max-batch-size", type=int, default=8, help="requests per batch (default: 8)")
    parser.add_argument("--batch-wait-ms", type=float, default=10.0,
                        help="how long a request waits for others to share its batch (default: 10)")
    parser.add_argument("--max-new-tokens", type=int, default=256,
                        help="the most tokens a request may ask for, and the chat default (default: 256)")
    parser.add_argument("--max-queue", type=int, default=256, help="queued requests before a 503 (default: 256)")
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20,
                        help="the largest request body; larger is a 413 (default: 1048576, 1 MiB)")
    parser.add_argument("--max-prompt-chars", type=int, default=200_000,
                        help="characters of prompt text in one request, checked before tokenizing (default: 200000)")
    parser.add_argument("--max-lora-rank", type=int, default=64,
                        help="the largest LoRA rank an adapter may have (default: 64, the sweep's largest)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                        help="compute dtype (auto: bfloat16 on a GPU that has it, else float32)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0: torch's default, one per core)")


def free_port() -> int:
    """A port on 127.0.0.1 free now (the OS picks it), for a server started next; another process may take it first."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def options_from_args(args: argparse.Namespace) -> ServeOptions:
    return ServeOptions(base=args.base, base_name=args.base_name, registry=args.registry, stage=args.stage,
                        adapters=tuple(args.adapter), adapter_roots=tuple(args.adapter_root or [Path.cwd()]),
                        max_adapters=args.max_adapters, max_batch_size=args.max_batch_size,
                        batch_wait_ms=args.batch_wait_ms, max_new_tokens=args.max_new_tokens,
                        max_queue=args.max_queue, max_body_bytes=args.max_body_bytes,
                        max_prompt_chars=args.max_prompt_chars, max_lora_rank=args.max_lora_rank, host=args.host,
                        port=args.port, device=args.device, dtype=args.dtype, threads=args.threads)


def device_and_dtype(device: str, dtype: str):
    import torch

    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else "cpu" if device == "auto" else device)
    if dtype != "auto":
        return dev, getattr(torch, dtype)
    # bf16 where the GPU has it; float32 on a CPU, where evaluation and merge compute too
    return dev, torch.bfloat16 if dev.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32


def serve(options: ServeOptions) -> None:
    import torch
    import uvicorn

    from tuneoff.serving.api import (
        ADMIN_TOKEN_ENV,
        API_KEY_ENV,
        Limits,
        create_app,
        secret_from_env,
    )
    from tuneoff.serving.engine import Engine
    from tuneoff.serving.model import MultiLoraModel

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for flag in ("max_adapters", "max_batch_size", "max_new_tokens", "max_queue", "max_body_bytes", "max_prompt_chars",
                 "max_lora_rank"):
        if getattr(options, flag) < 1:
            raise TuneoffError(f"--{flag.replace('_', '-')} must be at least 1")
    if options.batch_wait_ms < 0:
        raise TuneoffError("--batch-wait-ms must be 0 or more")
    check_name(options.base_name, "")
    specs, refused = catalog(options)
    if options.threads > 0:
        torch.set_num_threads(options.threads)
    dev, dtype = device_and_dtype(options.device, options.dtype)
    model = MultiLoraModel(options.base, options.base_name, dev, dtype, options.max_adapters, options.max_lora_rank)
    model.refused.update(refused)
    for i, spec in enumerate(specs):  # all checked against the base; the first max_adapters loaded now
        model.add(spec, load=i < options.max_adapters)
    engine = Engine(model, options.max_batch_size, options.batch_wait_ms / 1000, options.max_queue)
    admin_token, api_key = secret_from_env(ADMIN_TOKEN_ENV), secret_from_env(API_KEY_ENV)
    limits = Limits(options.max_new_tokens, options.max_body_bytes, options.max_prompt_chars)
    app = create_app(model, engine, limits, list(options.adapter_roots), admin_token, api_key)
    log.info("base %s (%s, %s on %s) as %r; adapters: %s", options.base, "4-bit" if model.base_is_4bit else "float",
             str(dtype).removeprefix("torch."), dev, options.base_name,
             ", ".join(f"{s.name} ({s.method or 'lora'})" for s in specs) or "none")
    for name, reason in refused.items():
        log.warning("not served: %s: %s", name, reason)
    log.info("admin endpoint %s", f"enabled (token from {ADMIN_TOKEN_ENV})" if admin_token
             else f"disabled (set {ADMIN_TOKEN_ENV} to enable)")
    log.info("/v1 %s", f"needs the API key in {API_KEY_ENV}" if api_key else f"is open (set {API_KEY_ENV} to need a key)")
    uvicorn.run(app, host=options.host, port=options.port, log_level="info")
