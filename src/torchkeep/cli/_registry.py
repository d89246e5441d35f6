"""``torchkeep registry``: list, show, register, alias, history, verify, lineage, compare, export,
delete; each as a table, or ``--json``.

A version is named as everywhere else (``REGISTRY/NAME@VERSION_OR_ALIAS``), or as separate
arguments (``REGISTRY NAME VERSION``): ``torchkeep registry show models/clf@production`` and
``torchkeep registry show models clf production`` are the same.
"""

from __future__ import annotations

import datetime
import json
from typing import Annotated, Any

import typer

import torchkeep as tk
from torchkeep.cli._errors import fail, handle_errors
from torchkeep.cli._help import Group
from torchkeep.cli._output import Column, emit_json, human_bytes, print_kv, print_line, print_table
from torchkeep.format import is_registry, parse_registry_reference

__all__ = ["register"]

_JSON = Annotated[bool, typer.Option("--json", help="Print JSON for programs.")]
_ARGS = Annotated[
    list[str], typer.Argument(help="REGISTRY/NAME[@VERSION] or REGISTRY NAME [VERSION] ...")
]


def register(app: typer.Typer) -> None:
    """Add the ``registry`` command group to the ``torchkeep`` app."""
    group = typer.Typer(
        cls=Group, no_args_is_help=True, help="Model versions: aliases, lineage, no server."
    )
    for name, command in (
        ("list", list_command),
        ("show", show_command),
        ("register", register_command),
        ("alias", alias_command),
        ("history", history_command),
        ("verify", verify_command),
        ("lineage", lineage_command),
        ("compare", compare_command),
        ("export", export_command),
        ("delete", delete_command),
    ):
        group.command(name)(command)
    app.add_typer(group, name="registry")


def _split(args: list[str]) -> tuple[tk.Registry, str | None, str | None, list[str]]:
    """``(registry, name, version, rest)`` from ``REGISTRY/NAME[@V] ...`` or
    ``REGISTRY [NAME ...]``."""
    first = args[0]
    if is_registry(first):
        return tk.Registry(first), (args[1] if len(args) > 1 else None), None, args[2:]
    parsed = parse_registry_reference(first)
    if parsed is None:
        raise tk.CheckpointNotFoundError(
            "not a registry, nor a REGISTRY/NAME@VERSION reference",
            path=first,
            hint="create one with `torchkeep registry register REGISTRY NAME SOURCE`",
        )
    which = parsed[2] if "@" in first else None
    return tk.Registry(parsed[0]), parsed[1], which, args[1:]


def _need(name: str | None, what: str) -> str:
    if name is None:
        fail(f"missing {what}", code=2)
    return name


def _when(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")


def _metrics(m: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in m.items())


def _json_object(text: str | None, option: str) -> dict[str, Any] | None:
    """A JSON object, or ``key=value[,key=value]`` (each value JSON when it parses)."""
    if text is None:
        return None
    if not text.lstrip().startswith("{") and "=" in text:
        pairs = [part.partition("=") for part in text.split(",")]
        return {k.strip(): _value(v.strip()) for k, _, v in pairs}
    try:
        value = json.loads(text)
    except ValueError as exc:
        fail(f"{option}: not JSON ({exc})", code=2)
    if not isinstance(value, dict):
        fail(f"{option}: give a JSON object, e.g. '{{\"lr\": 0.001}}', or lr=0.001", code=2)
    return value


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _versions_table(versions: list[tk.ModelVersion], title: str) -> None:
    print_table(
        [
            "version",
            Column("#", "right"),
            "created (UTC)",
            "fingerprint",
            "parent",
            "aliases",
            "metrics",
        ],
        [
            (
                v.version,
                v.number,
                _when(v.created),
                v.fingerprint[7:19],
                v.parent,
                ", ".join(v.aliases) or None,
                _metrics(v.metrics) or None,
            )
            for v in versions
        ],
        title=title,
    )


@handle_errors
def list_command(args: _ARGS, json_out: _JSON = False) -> None:
    """List the models of a registry, or the versions of one model."""
    reg, name, _, _ = _split(args)
    if name is None:
        rows = [(n, reg.versions(n), reg.aliases(n)) for n in reg.names()]
        if json_out:
            emit_json(
                [
                    {"name": n, "versions": len(vs), "latest": vs[-1].version, "aliases": a}
                    for n, vs, a in rows
                ]
            )
            return
        print_table(
            ["model", Column("versions", "right"), "latest", "aliases"],
            [
                (n, len(vs), vs[-1].version, ", ".join(f"{k}->{v}" for k, v in a.items()) or None)
                for n, vs, a in rows
            ],
        )
        return
    versions = reg.versions(name)
    if json_out:
        emit_json([v.to_dict() for v in versions])
        return
    _versions_table(versions, f"{reg.root}/{name}")


def _show(v: tk.ModelVersion) -> None:
    print_kv(
        [
            ("reference", v.reference),
            ("version", f"{v.version} (#{v.number})"),
            ("created", f"{_when(v.created)} UTC"),
            ("fingerprint", v.fingerprint),
            ("aliases", ", ".join(v.aliases) or None),
            ("parent", v.parent),
            ("source", v.source),
            ("model", v.model["class"] if v.model else None),
            ("tensors", f"{v.tensors} ({human_bytes(v.nbytes)})"),
            ("config", json.dumps(v.config) if v.config else None),
            ("metrics", _metrics(v.metrics) or None),
            ("history", f"{len(v.history)} records" if v.history else None),
            ("metadata", json.dumps(v.metadata) if v.metadata else None),
            ("torch", v.system.get("torch_version")),
            ("torchkeep", v.system.get("torchkeep_version")),
            ("git commit", v.system.get("git_commit")),
            ("by", f"{v.system.get('user')}@{v.system.get('host')}"),
        ]
    )


@handle_errors
def show_command(args: _ARGS, json_out: _JSON = False) -> None:
    """Show one version: fingerprint, config, metrics, lineage, versions of torch and torchkeep."""
    reg, name, which, rest = _split(args)
    v = reg.resolve(_need(name, "NAME"), which or (rest[0] if rest else "latest"))
    if json_out:
        emit_json(v.to_dict())
    else:
        _show(v)


@handle_errors
def register_command(
    registry: Annotated[str, typer.Argument(help="The registry's folder (created if new).")],
    name: Annotated[str, typer.Argument(help="The model's name, e.g. classifier.")],
    source: Annotated[str, typer.Argument(help="A checkpoint file, model directory or RUN@best.")],
    version: Annotated[
        str | None, typer.Option(help="A semantic version (default: next number).")
    ] = None,
    metadata: Annotated[str | None, typer.Option(help="JSON object of metadata.")] = None,
    config: Annotated[
        str | None, typer.Option(help="JSON object: config, hyperparameters.")
    ] = None,
    metrics: Annotated[str | None, typer.Option(help="JSON object of metrics.")] = None,
    parent: Annotated[
        str | None, typer.Option(help="Fine-tuned from: VERSION or NAME@VERSION.")
    ] = None,
    allow_duplicate: Annotated[
        bool, typer.Option("--allow-duplicate", help="Register identical weights again.")
    ] = False,
    json_out: _JSON = False,
) -> None:
    """Register a new version of a model from a checkpoint or a run reference."""
    reg = tk.Registry(registry)
    v = reg.register(
        name,
        source,
        version=version,
        metadata=_json_object(metadata, "--metadata"),
        config=_json_object(config, "--config"),
        metrics=_json_object(metrics, "--metrics"),
        parent=parent,
        allow_duplicate=allow_duplicate,
    )
    if json_out:
        emit_json(v.to_dict())
    elif v.duplicate:
        print_line(
            f"identical weights are already {v.reference}: not registered again "
            "(--allow-duplicate registers them anyway)"
        )
    else:
        print_line(f"registered {v.reference} ({v.fingerprint[:19]})")


@handle_errors
def alias_command(args: _ARGS, json_out: _JSON = False) -> None:
    """Point an alias at a version: REGISTRY NAME ALIAS VERSION (or REGISTRY/NAME@VERSION ALIAS)."""
    reg, name, which, rest = _split(args)
    if which is not None and len(rest) == 1:
        alias, version = rest[0], which
    elif len(rest) == 2 and which is None:
        alias, version = rest
    else:
        fail("give ALIAS and VERSION: torchkeep registry alias REGISTRY NAME ALIAS VERSION", code=2)
    move = reg.set_alias(_need(name, "NAME"), alias, version)
    if json_out:
        emit_json(move.to_dict())
    else:
        print_line(f"{name}@{alias}: {move.from_version or '(new)'} -> {move.to_version}")


@handle_errors
def history_command(args: _ARGS, json_out: _JSON = False) -> None:
    """Every move of an alias: REGISTRY NAME ALIAS (or REGISTRY/NAME@ALIAS)."""
    reg, name, which, rest = _split(args)
    alias = which or (rest[0] if rest else None)
    moves = reg.alias_history(_need(name, "NAME"), _need(alias, "ALIAS"))
    if json_out:
        emit_json([m.to_dict() for m in moves])
        return
    print_table(
        ["time (UTC)", "from", "to", "by"],
        [
            (_when(m.time), m.from_version, m.to_version, f"{m.user}@{m.host} pid {m.pid}")
            for m in moves
        ],
        title=f"{name}@{alias}",
    )


@handle_errors
def verify_command(args: _ARGS, json_out: _JSON = False) -> None:
    """Recompute fingerprints and tensor hashes: a version, a model, or the whole registry.

    Exits 1 when anything is damaged.
    """
    reg, name, which, rest = _split(args)
    report = reg.verify(name, which or (rest[0] if rest else None))
    if json_out:
        emit_json(report.to_dict())
    else:
        for problem in report.problems:
            print_line(problem)
        status = "ok" if report.ok else f"{len(report.problems)} problem(s)"
        print_line(f"{report.versions} version(s), {report.tensors} tensors checked: {status}")
    if not report.ok:
        raise typer.Exit(1)


@handle_errors
def lineage_command(args: _ARGS, json_out: _JSON = False) -> None:
    """A version's ancestors and descendants."""
    reg, name, which, rest = _split(args)
    lin = reg.lineage(_need(name, "NAME"), which or (rest[0] if rest else "latest"))
    if json_out:
        emit_json(lin.to_dict())
        return
    rows = [("ancestor", v) for v in reversed(lin.ancestors)]
    rows += [("this", lin.version)] + [("descendant", v) for v in lin.descendants]
    print_table(
        ["", "version", "parent", "aliases", "created (UTC)"],
        [
            (k, f"{v.name}@{v.version}", v.parent, ", ".join(v.aliases) or None, _when(v.created))
            for k, v in rows
        ],
    )
    for ref in lin.missing:
        print_line(f"parent {ref} was deleted")


@handle_errors
def compare_command(args: _ARGS, json_out: _JSON = False) -> None:
    """Compare two versions tensor by tensor: REGISTRY NAME V1 V2 (or two references)."""
    reg, name, which, rest = _split(args)
    if which is not None and len(rest) == 1:
        other = parse_registry_reference(rest[0])
        v1, v2 = which, other[2] if other and "@" in rest[0] else rest[0]
    elif which is None and len(rest) == 2:
        v1, v2 = rest
    else:
        fail("give two versions: torchkeep registry compare REGISTRY NAME V1 V2", code=2)
    c = reg.compare(_need(name, "NAME"), v1, v2)
    if json_out:
        emit_json(c.to_dict())
        return

    def num(x: float | None) -> str | None:
        return None if x is None else f"{x:.4g}"

    print_table(
        [
            "tensor",
            Column("rel. L2", "right"),
            Column("cosine", "right"),
            Column("changed", "right"),
            "identical",
        ],
        [
            (
                t.name,
                num(t.relative_l2),
                num(t.cosine),
                None if t.changed is None else f"{t.changed:.1%}",
                "yes" if t.identical else t.note,
            )
            for t in c.tensors
        ],
        title=f"{name}: {c.v1} -> {c.v2}",
    )
    print_line(f"{len(c.identical)} identical (frozen), {len(c.changed)} changed")
    for k in c.only_in_v1:
        print_line(f"only in {c.v1}: {k}")
    for k in c.only_in_v2:
        print_line(f"only in {c.v2}: {k}")


@handle_errors
def export_command(
    args: _ARGS,
    output: Annotated[str | None, typer.Option("--output", "-o", help="The JSON file.")] = None,
    json_out: _JSON = False,
) -> None:
    """Write a version's record as JSON: REGISTRY NAME VERSION OUT.json (or REF OUT.json)."""
    reg, name, which, rest = _split(args)
    if output is None:
        if not rest:
            fail("give the output file: torchkeep registry export REF -o OUT.json", code=2)
        output, rest = rest[-1], rest[:-1]
    version = which or (rest[0] if rest else "latest")
    path = reg.export_metadata(_need(name, "NAME"), version, output)
    if json_out:
        emit_json({"path": str(path)})
    else:
        print_line(f"wrote {path}")


@handle_errors
def delete_command(args: _ARGS, json_out: _JSON = False) -> None:
    """Delete a version (refused while an alias points at it): REGISTRY NAME VERSION."""
    reg, name, which, rest = _split(args)
    version = which or (rest[0] if rest else None)
    v = reg.resolve(_need(name, "NAME"), _need(version, "VERSION"))
    reg.delete(v.name, v.version)
    if json_out:
        emit_json({"deleted": v.reference})
    else:
        print_line(f"deleted {v.reference}")
