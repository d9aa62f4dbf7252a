"""``edgetl serve BUNDLE``: the click command (attached to ``edgetl``'s group by the main CLI).

Thin: it turns options into :class:`edgetl.serve.ServeOptions` and calls
:func:`edgetl.serve.server.serve`; errors a user can fix print ``error: ...`` on one line and
exit with their code, as every edgetl command does.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

import click

from ..core.commands import handle_errors
from ..errors import ConfigError, require


def _token(token, token_file) -> str:
    if token and token_file:
        raise ConfigError("give --token or --token-file, not both")
    if token_file:
        try:
            return token_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(
                f"--token-file {token_file}: cannot read it ({exc}); give a file holding the token"
            ) from None
    return token or ""


@click.command("serve")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on. Anything but the loopback makes every read need the token too.",
)
@click.option("--port", type=int, default=8080, show_default=True, help="TCP port (0: any free port, printed).")
@click.option(
    "--token",
    envvar="EDGETL_SERVE_TOKEN",
    help="The secret writes (and, beyond localhost, reads) need: "
    "'Authorization: Bearer TOKEN'. Default: a random one, printed once in the login URL.  "
    "[env: EDGETL_SERVE_TOKEN]",
)
@click.option("--token-file", type=click.Path(path_type=Path), help="Read the token from this file instead.")
@click.option(
    "--review",
    type=click.Path(path_type=Path),
    help="Folder of the review store (confirmed and corrected "
    "items that POST /adapt learns from). Without it, feedback and adapt are off.",
)
@click.option("--review-max-items", type=int, default=5000, show_default=True, help="Review store bound (items).")
@click.option("--review-max-mb", type=float, default=1024.0, show_default=True, help="Review store bound (MB).")
@click.option("--name", help="Model name in the KServe v2 paths.  [default: the bundle folder's name]")
@click.option(
    "--max-batch",
    type=int,
    default=8,
    show_default=True,
    help="Most items one model call answers when requests arrive together (1: no batching).",
)
@click.option(
    "--batch-wait-ms",
    type=float,
    default=0.0,
    show_default=True,
    help="How long a lone request waits for company before it runs (0: never waits).",
)
@click.option("--max-upload-mb", type=float, default=20.0, show_default=True, help="Largest request body.")
@click.option("--threads", type=int, help="Runtime intra-op threads (default: every core).")
@click.option("--device", help="OpenVINO device override (CPU, NPU, GPU, AUTO).")
@click.option(
    "--wait",
    type=float,
    default=10.0,
    show_default=True,
    help="Seconds an adapt or rollback waits for another process writing the bundle.",
)
@click.option(
    "--tolerance",
    type=float,
    default=5.0,
    show_default=True,
    help="Adapt gate: allowed accuracy drop on known classes, in percentage points.",
)
@click.option(
    "--sign",
    "sign_key",
    type=click.Path(path_type=Path),
    envvar="EDGETL_SIGN_KEY",
    help="Sign the head versions adapt and rollback write with this private key.  [env: EDGETL_SIGN_KEY]",
)
@click.option(
    "--body-timeout",
    type=float,
    default=30.0,
    show_default=True,
    help="Seconds a request body may take to arrive (slower: 408); idle connections close after 5 s.",
)
@click.option("--no-access-log", is_flag=True, help="No JSON access line per request on stderr.")
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print one JSON object on stdout once listening (url, port, "
    "model, head version, login URL if the token was generated).",
)
@handle_errors
def serve(
    bundle,
    host,
    port,
    token,
    token_file,
    review,
    review_max_items,
    review_max_mb,
    name,
    max_batch,
    batch_wait_ms,
    max_upload_mb,
    threads,
    device,
    wait,
    tolerance,
    sign_key,
    body_timeout,
    no_access_log,
    as_json,
):
    """Run BUNDLE as a local HTTP service with an operator page (needs edgetl[serve]; no torch).

    \b
    Endpoints: POST /predict (image bytes or multipart; text for text bundles), KServe v2
    (/v2/health/ready, /v2/models/NAME, /v2/models/NAME/infer), GET /metrics (Prometheus),
    POST /feedback, POST /adapt (the usual gate; the new head goes live without a failed
    request), GET /history, POST /rollback, and the operator page at /.

    \b
    Security: listens on 127.0.0.1 unless --host says otherwise; every write needs the token,
    even from localhost; beyond localhost every read does too (health checks stay open).
    """
    require("uvicorn", extra="serve", purpose="edgetl serve")
    require("starlette", extra="serve", purpose="edgetl serve")
    from ..core.signing import signing_key_from
    from ..device.adapt import check_tolerance
    from .server import configure_logging
    from .server import serve as run
    from .service import ServeOptions

    if not 0 <= port <= 65535:
        raise ConfigError(f"--port {port}: give 0 to 65535")
    if not 0 < body_timeout <= 3600:  # also refuses nan
        raise ConfigError(f"--body-timeout {body_timeout}: give seconds between 0 and 3600")
    if max_batch < 1 or batch_wait_ms < 0 or max_upload_mb <= 0 or review_max_items < 1 or review_max_mb <= 0:
        raise ConfigError(
            "--max-batch, --review-max-items must be >= 1; --max-upload-mb, --review-max-mb > 0; --batch-wait-ms >= 0"
        )
    options = ServeOptions(
        host=host,
        token=_token(token, token_file),
        review=review,
        name=name,
        max_batch=max_batch,
        batch_wait_ms=batch_wait_ms,
        max_upload_mb=max_upload_mb,
        review_max_items=review_max_items,
        review_max_mb=review_max_mb,
        threads=threads,
        device=device,
        signer=signing_key_from(sign_key),
        wait=wait,
        tolerance_pp=check_tolerance(tolerance),
        access_log=not no_access_log,
        body_timeout_s=body_timeout,
    )
    configure_logging(not no_access_log)

    def started(s) -> None:
        if as_json:
            click.echo(json.dumps({k: v for k, v in asdict(s).items()}))
        else:
            click.echo(f"edgetl serve: {s.model} ({s.task}, head v{s.version}) at {s.url}  (Ctrl-C stops)")
            if s.login_url:
                click.echo(f"operator page: {s.login_url}  (a random token; give --token to choose one)")
        sys.stdout.flush()
        os.environ.pop("EDGETL_SERVE_TOKEN", None)  # not handed to anything this process starts

    run(bundle, options, port=port, on_start=started)
