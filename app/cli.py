"""The ``pcbm`` command: database, users, tokens and the web server.

The library's commands (``pcbm embed``, ``pcbm train``, ...) live in ``ml.cli`` and are
mounted here by :func:`register_ml_commands`. Every command takes ``--workspace``. Bad
input ends with one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from sqlalchemy.exc import SQLAlchemyError

from app.errors import AppError
from app.settings import Settings, SettingsError
from ml.errors import PCBMError

app = typer.Typer(
    name="pcbm",
    help="PCBM Studio: post-hoc concept bottleneck models — library commands, database, users and the web app.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="The app's database schema.", no_args_is_help=True)
users_app = typer.Typer(help="User accounts (there are no default accounts).", no_args_is_help=True)
tokens_app = typer.Typer(help="API tokens (bearer tokens for the REST API).", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(users_app, name="users")
app.add_typer(tokens_app, name="tokens")

WorkspaceOpt = Annotated[
    Path | None,
    typer.Option("--workspace", "-w", help="Workspace directory (default: $PCBM_WORKSPACE, else ./workspace).",
                 envvar="PCBM_WORKSPACE", show_default=False),
]


def fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code=2)


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error.get("loc", ()))
        message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"PCBM_{where.upper()}: {message}" if where else message)
    return "invalid settings: " + "; ".join(parts)


@contextmanager
def cli_errors() -> Iterator[None]:
    """Turn every error a user can cause into one line and exit status 2."""
    try:
        yield
    except (PCBMError, AppError, SettingsError) as exc:
        raise fail(str(exc)) from None
    except ValidationError as exc:
        raise fail(_validation_message(exc)) from None
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise fail(f"database error: {reason}") from None
    except OSError as exc:
        raise fail(f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc)) from None


def load_settings(workspace: Path | None) -> Settings:
    return Settings(workspace=workspace) if workspace is not None else Settings()


def _database(settings: Settings, *, require_schema: bool = True):
    from app.context import open_database
    from app.migrate import check_database

    engine, factory = open_database(settings)
    if require_schema:
        check_database(engine)
    return engine, factory


@contextmanager
def _db_session(settings: Settings) -> Iterator[Any]:
    """One transaction on the migrated database of ``settings``; the engine is disposed after."""
    from app.db import session_scope

    engine, factory = _database(settings)
    try:
        with session_scope(factory) as session:
            yield session
    finally:
        engine.dispose()


# -- db ------------------------------------------------------------------------------------

@db_app.command("upgrade")
def db_upgrade(workspace: WorkspaceOpt = None) -> None:
    """Create or upgrade the database schema to this version of PCBM Studio."""
    from app.migrate import current_revision, upgrade

    with cli_errors():
        settings = load_settings(workspace)
        engine, _ = _database(settings, require_schema=False)
        try:
            upgrade(engine)
            typer.echo(f"database {engine.url.render_as_string(hide_password=True)} is at revision "
                       f"{current_revision(engine)}")
        finally:
            engine.dispose()


@db_app.command("current")
def db_current(workspace: WorkspaceOpt = None) -> None:
    """Show the database's schema revision and this code's head revision."""
    from app.migrate import current_revision, head_revision

    with cli_errors():
        engine, _ = _database(load_settings(workspace), require_schema=False)
        try:
            typer.echo(f"database: {current_revision(engine) or '(empty)'}\ncode:     {head_revision()}")
        finally:
            engine.dispose()


# -- users and tokens ------------------------------------------------------------------------

@users_app.command("create")
def users_create(
    name: Annotated[str, typer.Argument(help="User name (letters, digits, '_', '-', '.', '@').")],
    role: Annotated[str, typer.Option(help="admin, researcher or participant.")] = "researcher",
    password_stdin: Annotated[bool, typer.Option("--password-stdin", help="Read a password from the first line of stdin.")] = False,
    workspace: WorkspaceOpt = None,
) -> None:
    """Create a user. Without a password, log in with `pcbm users link` or an API token."""
    from app.services import users

    with cli_errors():
        password = None
        if password_stdin:
            password = sys.stdin.readline().rstrip("\r\n")
            if not password:
                raise fail("--password-stdin was given but stdin holds no password")
        with _db_session(load_settings(workspace)) as session:
            user = users.create_user(session, name, role, password)
            typer.echo(f"created {user.role.value} {user.name!r} (id {user.id})")


@users_app.command("link")
def users_link(
    name: Annotated[str, typer.Argument(help="User to log in as.")],
    base_url: Annotated[str, typer.Option(help="Where the app is served.")] = "http://127.0.0.1:8000",
    workspace: WorkspaceOpt = None,
) -> None:
    """Print a one-time login link for a user (single use, expires after PCBM_LOGIN_LINK_TTL_S)."""
    from app.services import users

    with cli_errors():
        settings = load_settings(workspace)
        with _db_session(settings) as session:
            user = users.get_user_by_name(session, name)
            path = users.create_login_link(session, user, ttl_s=settings.login_link_ttl_s)
        typer.echo(base_url.rstrip("/") + path)


@tokens_app.command("create")
def tokens_create(
    name: Annotated[str, typer.Argument(help="User the token belongs to.")],
    label: Annotated[str, typer.Option(help="A name for the token, to recognise it later.")] = "cli",
    workspace: WorkspaceOpt = None,
) -> None:
    """Create an API token and print it (once: only its hash is stored)."""
    from app.services import users

    with cli_errors():
        with _db_session(load_settings(workspace)) as session:
            user = users.get_user_by_name(session, name)
            _, plain = users.create_token(session, user, label)
        typer.echo(plain)


# -- serve -----------------------------------------------------------------------------------

@app.command()
def serve(
    workspace: WorkspaceOpt = None,
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    proxy_headers: Annotated[bool, typer.Option(help="Trust X-Forwarded-* from --forwarded-allow-ips (behind a TLS proxy).")] = False,
    forwarded_allow_ips: Annotated[str, typer.Option(help="Proxies whose X-Forwarded-* headers are trusted.")] = "127.0.0.1",
) -> None:
    """Serve the web app and the REST API (OpenAPI docs at /docs)."""
    import uvicorn

    from app.main import create_app

    with cli_errors():
        settings = load_settings(workspace)
        engine, _ = _database(settings)  # refuse to start on an unmigrated or outdated database
        engine.dispose()
        web_app = create_app(settings)
    # uvicorn finishes in-flight requests on SIGTERM, then re-raises the signal under the
    # handler it found: make that handler a clean exit (status 0), not death by signal.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    uvicorn.run(web_app, host=host, port=port, proxy_headers=proxy_headers,
                forwarded_allow_ips=forwarded_allow_ips, log_level="info")


# -- the library's commands --------------------------------------------------------------------

def register_ml_commands(cli: typer.Typer) -> bool:
    """Mount ``ml.cli``'s commands (embed, train, ...) at the top level of ``cli``.

    Returns whether they were found. The lead adds ``pcbm demo`` the same way.
    """
    try:
        from ml.cli import cli as ml_cli
    except ModuleNotFoundError as exc:
        if exc.name == "ml.cli":
            return False
        raise
    cli.add_typer(ml_cli)
    return True


register_ml_commands(app)


def main() -> None:
    app()


# -- the offline demo ---------------------------------------------------------------------------

DEFAULT_DEMO_WORKSPACE = Path("data") / "demo"


@app.command()
def demo(
    workspace: Annotated[Path | None, typer.Option("--workspace", "-w", help="Where the demo is built (default: ./data/demo).")] = None,
    config: Annotated[Path | None, typer.Option(help="A world config JSON (see docs/demo-world.md); default: the shipped one.")] = None,
    no_serve: Annotated[bool, typer.Option("--no-serve", help="Only build the workspace; do not start the server.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the build report as JSON.")] = False,
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1 to serve on.")] = 8000,
    force: Annotated[bool, typer.Option(help="Rebuild even if a finished build with the same inputs exists.")] = False,
) -> None:
    """Build the offline demo (world, embeddings, concept banks, PCBM and PCBM-h) and serve it on 127.0.0.1."""
    import json

    from ml.demo.build import build_demo
    from ml.demo.world import WorldConfig

    with cli_errors():
        root = (workspace or DEFAULT_DEMO_WORKSPACE).expanduser().resolve()
        world = WorldConfig.load(config) if config is not None else None
        log = (lambda message: None) if as_json else (lambda message: typer.echo(message, err=True))
        report = build_demo(root, world, log=log, force=force)
        if as_json:
            typer.echo(json.dumps(report, indent=2))
        else:
            _print_demo_summary(report)
        if no_serve:
            return
        settings = load_settings(root)
        url = _prepare_demo_server(settings, port)
    import uvicorn

    from app.main import create_app

    typer.echo(f"\n  PCBM Studio is serving the demo. Open this one-time login link:\n\n    {url}\n", err=True)
    uvicorn.run(create_app(settings), host="127.0.0.1", port=port, log_level="warning")


def _print_demo_summary(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"demo: backbone {report['backbone']}, {report['n_concepts']} concepts"
                        + (" (cached)" if report.get("cached") else ""))
    table.add_column("split")
    for column in ("linear probe", "PCBM", "PCBM-h", "PCBM, background pruned"):
        table.add_column(column, justify="right")
    for split in report["pcbm"]:
        table.add_row(split, *(f"{report[key][split]:.3f}" for key in ("linear_probe", "pcbm", "pcbm_h")),
                      f"{report['edit']['after'][split]:.3f}")
    console = Console(stderr=True)
    console.print(table)
    concepts = report["concepts"]
    console.print(f"text concepts: mean AUROC {concepts['text_mean_auroc']:.3f}; "
                  f"CAVs: mean held-out accuracy {concepts['cav_mean_heldout_acc']:.3f}")


def _prepare_demo_server(settings: Settings, port: int) -> str:
    """Migrate and return a one-time login link for the demo's admin account.

    The server imports the workspace's models itself at start-up (``/readyz`` waits for it).
    The demo account has no password: the only way in is a one-time link like this one.
    """
    from sqlalchemy import select

    from app.context import open_database
    from app.db import session_scope
    from app.migrate import upgrade
    from app.models import User
    from app.services import users

    engine, factory = open_database(settings)
    try:
        upgrade(engine)
        with session_scope(factory) as session:
            user = session.scalars(select(User).where(User.name == "demo")).first()
            if user is None:
                user = users.create_user(session, "demo", "admin", None)
            path = users.create_login_link(session, user, ttl_s=settings.login_link_ttl_s)
    finally:
        engine.dispose()
    return f"http://127.0.0.1:{port}{path}"


# -- user studies ---------------------------------------------------------------------------------

study_app = typer.Typer(help="User studies: set one up, invite participants, close it, export everything.",
                        no_args_is_help=True)
app.add_typer(study_app, name="study")


def _study(session, study_id: int):
    from app.errors import NotFound
    from app.models_studies import Study

    study = session.get(Study, study_id)
    if study is None:
        raise NotFound(f"no study with id {study_id}")
    return study


@study_app.command("create")
def study_create(
    name: Annotated[str, typer.Argument(help="The study's name.")],
    model: Annotated[str, typer.Option(help="Name of the base model (its current version is used).")],
    task: Annotated[str, typer.Option(help="The task, as participants will read it.")],
    owner: Annotated[str, typer.Option(help="The researcher (or admin) who owns the study.")],
    condition: Annotated[list[str] | None, typer.Option(
        help="A condition as 'name: tool, tool' (tools: weights, maps, preview, suggestions); repeat for more.",
    )] = None,
    visible_splits: Annotated[str, typer.Option(help="none, in_distribution or all.")] = "in_distribution",
    target_split: Annotated[str | None, typer.Option(help="The held-out split (default: the shifted one).")] = None,
    budget: Annotated[int | None, typer.Option(help="Most prunes per participant.")] = None,
    time_limit_min: Annotated[int | None, typer.Option(help="Minutes per participant.")] = None,
    consent: Annotated[str, typer.Option(help="Consent text shown before joining.")] = "",
    workspace: WorkspaceOpt = None,
) -> None:
    """Create a study in draft (open it with `pcbm study open`)."""
    from sqlalchemy import select

    from app.errors import NotFound
    from app.models import Model
    from app.services import studies, users

    with cli_errors(), _db_session(load_settings(workspace)) as session:
        user = users.get_user_by_name(session, owner)
        model_id = session.scalar(select(Model.id).where(Model.name == model))
        if model_id is None:
            raise NotFound(f"no model named {model!r}")
        conditions = studies.parse_conditions_text("\n".join(condition or [])) or None
        study = studies.create_study(
            session, user, name=name, base_model_id=model_id, task=task, consent_text=consent,
            visible_splits=visible_splits, target_split=target_split, conditions=conditions,
            edit_budget=budget, time_limit_s=time_limit_min * 60 if time_limit_min else None)
        typer.echo(f"created study {study.id} ({study.status.value}): {study.name!r} on {model} "
                   f"v{study.base_version}, target split {study.target_split}")


def _set_study_status(study_id: int, action: str, workspace: Path | None) -> None:
    from app.services import studies, users

    with cli_errors(), _db_session(load_settings(workspace)) as session:
        study = _study(session, study_id)
        owner = users.get_user(session, study.owner_id)
        change = studies.open_study if action == "open" else studies.close_study
        typer.echo(f"study {study_id} is {change(session, owner, study_id).status.value}")


@study_app.command("open")
def study_open(study_id: Annotated[int, typer.Argument(help="The study's id.")],
               workspace: WorkspaceOpt = None) -> None:
    """Open a draft study: its invitations work from now on."""
    _set_study_status(study_id, "open", workspace)


@study_app.command("close")
def study_close(study_id: Annotated[int, typer.Argument(help="The study's id.")],
                workspace: WorkspaceOpt = None) -> None:
    """Close a study: nothing changes in it any more."""
    _set_study_status(study_id, "close", workspace)


@study_app.command("invite")
def study_invite(
    study_id: Annotated[int, typer.Argument(help="The study's id.")],
    count: Annotated[int, typer.Option(help="How many single-use links.")] = 1,
    base_url: Annotated[str, typer.Option(help="Where the app is served.")] = "http://127.0.0.1:8000",
    workspace: WorkspaceOpt = None,
) -> None:
    """Print single-use invitation links, one per line (only their hashes are stored)."""
    from app.services import studies, users

    with cli_errors(), _db_session(load_settings(workspace)) as session:
        study = _study(session, study_id)
        owner = users.get_user(session, study.owner_id)
        for code in studies.create_invitations(session, owner, study_id, count):
            typer.echo(base_url.rstrip("/") + studies.join_path(code))


@study_app.command("export")
def study_export(
    study_id: Annotated[int, typer.Argument(help="The study's id.")],
    format: Annotated[str, typer.Option("--format", "-f", help="csv, parquet or json.")] = "csv",
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write the files into.")] = Path("."),
    workspace: WorkspaceOpt = None,
) -> None:
    """Export a study's events, participants, submissions, prunes and baselines (see docs/studies.md).

    Export from a closed study to be sure no event is still on its way from a running server.
    """
    from app.db import session_scope
    from app.services import study_export as exporter
    from app.services.artifacts import ArtifactStore
    from app.services.model_service import ModelService

    with cli_errors():
        exporter.check_format(format)
        settings = load_settings(workspace)
        engine, factory = _database(settings)
        try:
            artifacts = ArtifactStore(settings.artifacts_root)
            with session_scope(factory) as session:
                study = _study(session, study_id)
                bundle = exporter.export_bundle(session, ModelService(settings, factory, artifacts), artifacts, study)
            written = exporter.write_folder(bundle, format, out)
        finally:
            engine.dispose()
        tables = bundle["tables"]
        typer.echo(f"study {study_id}: {len(tables['events'])} events, {len(tables['participants'])} participants, "
                   f"{len(tables['submissions'])} submissions -> " + ", ".join(str(p) for p in written))
