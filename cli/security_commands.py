"""kvctl's security commands: `certs init`, `user add/list/delete`, `login`, `whoami`.

Users and tokens live in the cluster (the node keeps only a token's SHA-256); kvctl shows a new
token once and can save one for later commands (`kvctl login`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.table import Table
from rich.text import Text

from cli import certs, cluster_file, encryption_keys
from cli.errors import InvalidUsage, KvctlError
from cli.output import print_json, stdout_console
from cli.settings import Settings, client_options, json_option, login_token_path, settings_of


def _settings() -> Settings:
    return settings_of(click.get_current_context())


@click.group("certs", short_help="Make development TLS certificates.")
def certs_group() -> None:
    """Make development TLS certificates (a CA, one certificate per node, one for kvctl)."""


@certs_group.command("init")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--nodes", "-n", type=click.IntRange(min=1), default=3, show_default=True, help="node count"
)
@click.option("--force", is_flag=True, help="replace certificates already in DIRECTORY")
@json_option()
def certs_init_command(directory: Path, nodes: int, force: bool) -> None:
    """Write a development CA and certificates into DIRECTORY.

    ca.pem (+ ca-key.pem), node{i}.pem / node{i}-key.pem for i in 1..NODES, and kvctl.pem /
    kvctl-key.pem for kvctl. Every certificate names 127.0.0.1 and localhost. Keys are not
    encrypted (mode 0600): for local clusters and tests, not production.

    \b
    Examples:
      kvctl certs init ./certs --nodes 3
      kvctl cluster up --tls      # does this itself, in DATA_DIR/certs
    """
    written = certs.init_certs(directory, list(range(1, nodes + 1)), overwrite=force)
    if _settings().json_output:
        print_json({"files": [str(path) for path in written]})
        return
    for path in written:
        click.echo(str(path))


def _grants(roles: tuple[str, ...]) -> dict[str, object]:
    admin = False
    prefixes: dict[str, list[str]] = {"read": [], "write": []}
    for role in roles:
        kind, sep, prefix = role.partition(":")
        if kind == "admin" and not sep:
            admin = True
        elif kind in ("read", "write", "readwrite") and sep:
            for action, granted in prefixes.items():
                if action in kind:
                    granted.append(prefix)
        else:
            raise InvalidUsage(
                f"--role {role!r}: use admin, read:PREFIX, write:PREFIX or readwrite:PREFIX "
                "(an empty PREFIX means every key)"
            )
    return {"admin": admin, **prefixes}


@click.group("user", short_help="Add, list and delete users (admins only).")
def user_group() -> None:
    """Manage users: each has a bearer token and grants (admin, read/write on key prefixes)."""


@user_group.command("add")
@click.argument("name")
@click.option(
    "--role",
    "roles",
    multiple=True,
    required=True,
    metavar="ROLE",
    help="admin, read:PREFIX, write:PREFIX or readwrite:PREFIX; repeat for more",
)
@click.option(
    "--token-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="also write the new token to FILE (mode 0600)",
)
@client_options
def user_add_command(name: str, roles: tuple[str, ...], token_file: Path | None) -> None:
    """Create user NAME (or replace its grants) and print its new token.

    The token is shown once: the cluster keeps only its hash. Adding an existing user issues a
    new token and revokes the old one.

    \b
    Examples:
      kvctl user add alice --role readwrite:app/ --role read:shared/
      kvctl user add ops --role admin --token-file ops.token
      kvctl user add reader --role read:     # read every key
    """
    settings = _settings()
    answer = settings.client().put_user(name, _grants(roles))
    token = str(answer["token"])
    if token_file is not None:
        cluster_file.write_private(token_file, token + "\n")
    if settings.json_output:
        print_json(answer)
        return
    click.echo(token)
    click.echo(f"user {name!r} has a new token (shown once); `kvctl login` can save it", err=True)


@user_group.command("list")
@client_options
def user_list_command() -> None:
    """List users and their grants (never their tokens).

    \b
    Examples:
      kvctl user list
      kvctl user list --json | jq '.users[].name'
    """
    settings = _settings()
    users = settings.client().list_users()
    if settings.json_output:
        print_json({"users": users})
        return
    table = Table("user", "admin", "read", "write")
    for user in users:
        grants = user.get("grants", {})
        table.add_row(
            str(user.get("name")),
            "yes" if grants.get("admin") else "",
            ", ".join(repr(p) for p in grants.get("read", [])),
            ", ".join(repr(p) for p in grants.get("write", [])),
        )
    stdout_console().print(table)


@user_group.command("delete")
@click.argument("name")
@client_options
def user_delete_command(name: str) -> None:
    """Delete user NAME; its token stops working at once. The last admin cannot go.

    \b
    Example:
      kvctl user delete alice
    """
    settings = _settings()
    settings.client().delete_user(name)
    if settings.json_output:
        print_json({"name": name, "deleted": True})
        return
    click.echo(f"deleted user {name!r}")


@click.command("login", short_help="Check a token and save it for later commands.")
@click.option(
    "--token-file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="read the token from FILE (default: --token, $KVCTL_TOKEN, else ask)",
)
@client_options
def login_command(token_file: Path | None) -> None:
    """Check a token against the cluster, then save it (mode 0600) in the data directory,
    where later kvctl commands find it.

    \b
    Examples:
      kvctl login --token-file alice.token
      kvctl user add bob --role read:b/ | kvctl login --token-file /dev/stdin
    """
    settings = _settings()
    if token_file is not None:
        token = cluster_file.read_token(token_file)
    else:
        token = settings.token or ""
        if not token:
            if not sys.stdin.isatty():
                raise InvalidUsage("no token: pass --token-file FILE or --token TOKEN")
            token = click.prompt("token", hide_input=True).strip()
    who = settings.client(token=token).whoami()
    if not who.get("auth_enabled", True):
        raise KvctlError("this cluster runs without auth: there is nothing to log in to")
    path = login_token_path()
    cluster_file.write_private(path, token + "\n")
    if settings.json_output:
        print_json({"name": who["name"], "saved": str(path)})
        return
    stdout_console().print(Text(f"logged in as {who['name']!r}; token saved in {path}"))


@click.command("whoami", short_help="Show the user kvctl's token belongs to.")
@client_options
def whoami_command() -> None:
    """Show the user (and grants) the current token belongs to.

    \b
    Examples:
      kvctl whoami
      kvctl whoami --token "$(cat alice.token)" --json
    """
    settings = _settings()
    who = settings.client().whoami()
    if settings.json_output:
        print_json(who)
        return
    grants = who.get("grants", {})
    click.echo(
        f"{who['name']}: admin={bool(grants.get('admin'))} read={grants.get('read')} "
        f"write={grants.get('write')} (auth {'on' if who.get('auth_enabled') else 'off'})"
    )


@click.group("encryption", short_help="Manage the keys of encryption at rest.")
def encryption_group() -> None:
    """Manage the key file of encryption at rest (see docs/security.md)."""


@encryption_group.command("rotate-key")
@click.argument("key_file", metavar="FILE", type=click.Path(dir_okay=False, path_type=Path))
@json_option()
def rotate_key_command(key_file: Path) -> None:
    """Add a new AES-256 key to FILE (creating it) and make it the active one.

    Nodes read FILE at start: restart them (`kvctl node restart ID`) and new writes use the new
    key, while values written before stay readable with the old ones, which FILE keeps.

    \b
    Examples:
      kvctl encryption rotate-key data/cluster/encryption.keys
      kvctl node restart 1 && kvctl node restart 2 && kvctl node restart 3
    """
    key_id = encryption_keys.rotate(key_file)
    if _settings().json_output:
        print_json({"file": str(key_file), "active": key_id})
        return
    click.echo(f"{key_file}: new active key {key_id!r}; restart the nodes to use it")


SECURITY_COMMANDS = (certs_group, user_group, login_command, whoami_command, encryption_group)
