"""Command line: ``python -m dreamr.serve`` serves a reasoner over OpenAI's HTTP API (uvicorn).

Models in this process (loaded with ``SpeculativeReasoner.from_pretrained``: built-in names, folders or
Hugging Face ids), or two vLLM servers (``dreamr.remote.RemoteReasoner``):

    python -m dreamr.serve --target gemma-3-270m --draft smollm2-135m-instruct --port 8000
    python -m dreamr.serve --target-url http://127.0.0.1:8101 --draft-url http://127.0.0.1:8102

The dreamr flags set the server's defaults; each request may override any setting (extra body fields).
"""

from __future__ import annotations

import argparse
import sys

from dreamr.__main__ import _alpha
from dreamr.config import MODES

LOCAL_ONLY = ("dtype", "device")
REMOTE_ONLY = ("target_model", "draft_model", "max_concurrency")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dreamr.serve", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default="dreamr", help="the model name clients send (dreamr)")
    p.add_argument("--log-level", default="info", help="uvicorn's log level (info)")
    local = p.add_argument_group("models in this process")
    local.add_argument("--target", help="target model: built-in name, local path or Hugging Face id")
    local.add_argument("--draft", help="draft model: built-in name, local path, Hugging Face id or 'self[:k]'")
    local.add_argument("--dtype", default=None, help="model dtype (float32, bfloat16, ...)")
    local.add_argument("--device", default=None, help="device (cpu, cuda, ...; default cpu)")
    remote = p.add_argument_group("vLLM servers")
    remote.add_argument("--target-url", help="the target's vLLM server (http://host:port)")
    remote.add_argument("--draft-url", help="the draft's vLLM server")
    remote.add_argument("--target-model", help="the target's model name on its server (default: the one it serves)")
    remote.add_argument("--draft-model", help="the draft's model name on its server")
    remote.add_argument("--max-concurrency", type=int, help="requests in flight at once")
    settings = p.add_argument_group("dreamr defaults (each request may override them)")
    settings.add_argument("--mode", choices=list(MODES))
    settings.add_argument("--alpha", type=_alpha, help="accept a drafted step iff cpn > alpha, or 'auto'")
    settings.add_argument("--window", type=int, help="mode fpsr: the lookahead window")
    settings.add_argument("--max-new-tokens", type=int, help="the token budget of a request")
    return p


def build_reasoner(args: argparse.Namespace, parser: argparse.ArgumentParser):
    """The reasoner the arguments name; a missing or contradictory backend is a usage error (exit 2)."""
    local = args.target is not None or args.draft is not None
    remote = args.target_url is not None or args.draft_url is not None
    if local and remote:
        parser.error("choose one backend: --target/--draft (models in this process) or --target-url/--draft-url "
                     "(vLLM servers), not both")
    if not (local or remote):
        parser.error("choose a backend: --target NAME --draft NAME (models in this process) or --target-url URL "
                     "--draft-url URL (vLLM servers)")
    wrong = [n for n in (REMOTE_ONLY if local else LOCAL_ONLY) if getattr(args, n) is not None]
    if wrong:
        flags = ", ".join("--" + n.replace("_", "-") for n in wrong)
        parser.error(f"{flags}: only with {'--target-url' if local else '--target'}")
    if remote and args.target_url is None:
        parser.error("--draft-url needs --target-url")
    overrides = {k: getattr(args, k) for k in ("mode", "alpha", "window", "max_new_tokens")
                 if getattr(args, k) is not None}
    try:  # bad settings, names or URLs: usage errors, no traceback
        if local:
            from dreamr.reasoner import SpeculativeReasoner

            return SpeculativeReasoner.from_pretrained(target=args.target, draft=args.draft, dtype=args.dtype,
                                                       device=args.device or "cpu", **overrides)
        from dreamr.remote import RemoteReasoner  # the remote backend is optional: imported only when asked

        extra = {} if args.max_concurrency is None else {"max_concurrency": args.max_concurrency}
        return RemoteReasoner(args.target_url, args.draft_url, target_model=args.target_model,
                              draft_model=args.draft_model, **extra, **overrides)
    except ValueError as exc:
        parser.error(str(exc))


def main(argv=None) -> int:
    import uvicorn

    from dreamr.serve.app import create_app

    parser = _parser()
    args = parser.parse_args(argv)
    reasoner = build_reasoner(args, parser)
    app = create_app(reasoner, served_model_name=args.served_model_name)
    close = getattr(reasoner, "aclose", None)  # a remote reasoner's HTTP clients close with the server
    if close is not None:
        app.router.on_shutdown.append(close)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
