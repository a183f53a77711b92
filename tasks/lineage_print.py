"""`lmcore lineage` for people: the chain `tasks.lineage.model_lineage` found, one block per node, with rich."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape

from lmcore.redact import redact_tree


def render(lineage: dict, console=None) -> None:
    """The chain for people: one block per node, newest first, each preceded by how it was found. Lines are
    not wrapped, so hashes stay whole for copying. Credentials in URLs are masked, whoever built `lineage`."""
    lineage = redact_tree(lineage)
    console = console or Console(soft_wrap=True, highlight=False)
    console.print(f"[bold]Lineage of {escape(lineage['model'])}[/bold]  [dim]({escape(lineage['tracking_uri'])})[/dim]")
    for node in lineage["chain"]:
        if node.get("found_by"):
            console.print(f"  [dim]\u2191 {escape(node['found_by'])}[/dim]")
        title, rows = _describe(node)
        console.print(f"[bold cyan]{escape(title)}[/bold cyan]")
        width = max((len(key) for key, _ in rows), default=0)
        for key, value in rows:
            console.print(f"    [dim]{escape(key.ljust(width))}[/dim]  {escape(value)}")
    for warning in lineage["warnings"]:
        console.print(f"[yellow]warning:[/yellow] {escape(warning)}")


def _describe(node: dict) -> tuple[str, list[tuple[str, str]]]:
    kind = node["kind"]
    rows: list[tuple[str, str]] = []

    def add(key: str, value) -> None:
        if value not in (None, "", {}, []):
            rows.append((key, str(value)))

    if kind == "model_version":
        aliases = " ".join(f"@{a}" for a in node["aliases"])
        add("weights sha256", node["weights_sha256"])
        add("run", node["run_id"])
        add("created", node["created"])
        add("fine-tune", node["finetune"])
        add("base weights sha256", node["base_weights_sha256"])
        add("continued weights sha256", node.get("continued_weights_sha256"))
        add("tokens manifest", node["tokens_manifest_sha256"])
        add("raw manifest", node["raw_manifest_sha256"])
        add("fine-tune data manifest", node["finetune_manifest_sha256"])
        return f"model version  {node['name']} v{node['version']}  {aliases}".rstrip(), rows
    if kind == "run":
        add("status", f"{node['status']}, started {node['start_time']}")
        add("git commit", node["git_commit"])
        add("params sha256", node["params_sha256"])
        add("Prefect flow run", node["prefect_flow_run_id"])
        add("launcher", node["launcher"])
        add("parent run", node["parent_run_id"])
        add("tokens", _counts(node.get("tokens")))
        for key in ("documents_kept", "sources", "files", "bytes", "tokens_manifest_sha256", "raw_manifest_sha256",
                    "base_manifest_sha256"):
            add(key.replace("_", " "), node.get(key))
        dvc = node["dvc"]
        add("DVC hashed by", dvc["hashed_by"])
        for label, hashes in (("DVC deps", dvc["deps"]), ("DVC outs", dvc["outs"])):
            for i, (path, md5) in enumerate(hashes.items()):
                rows.append((label if i == 0 else "", f"{path}  {md5}"))
        return f"run  {node['stage']}  {node['run_id']}", rows
    if kind == "tokens_manifest":
        add("artifact", node.get("artifact") or "not logged")
        add("verified", node.get("verified"))
        add("shards", node.get("shards"))
        add("tokens", _counts(node.get("tokens")))
        add("documents sha256", node.get("documents_sha256"))
        return f"tokens manifest  {node['sha256']}", rows
    if kind == "base_model":
        add("manifest sha256", f"{node['manifest_sha256']} (verified: {node['verified']})")
        add("source", node["source"])
        add("architecture", node["architecture"])
        add("parameters", f"{node['parameters']:,}" if node["parameters"] else None)
        add("tokenizer", node["tokenizer"])
        add("licence", node["license"])
        for f in node["files"]:
            size = "" if f["bytes"] is None else f", {f['bytes']:,} bytes"
            rows.append((f["file"] or "", f"sha256 {f['sha256']} ({f['origin']}{size})"))
            rows.append(("", str(f["url"] or f["path"] or "")))
        return f"pretrained base  {node['name']}", rows
    title = "raw sources" if kind == "raw_sources" else "fine-tune data"
    add("manifest sha256", node["manifest_sha256"] + ("" if node["verified"] is None else f" (verified: {node['verified']})"))
    for src in node["sources"]:
        size = "" if src["bytes"] is None else f", {src['bytes']:,} bytes"
        rows.append((src["name"], f"sha256 {src['sha256']} ({src['origin']}{size})"))
        rows.append(("", f"{src['url']}"))
        rows.append(("", f"licence: {src['license']}"))
    return title, rows


def _counts(counts: dict | None) -> str | None:
    return None if not counts else ", ".join(f"{k} {v:,}" for k, v in counts.items() if v is not None)
