"""`p2pfl topology`: the overlay a schedule builds for a set of node ids, as a table, JSON or a
topology file to edit and reuse."""

from __future__ import annotations

from pathlib import Path

import typer


def topology(
    schedule: str = typer.Option("partial-mesh", help="ring | random-walk | partial-mesh."),
    nodes: int = typer.Option(8, min=1, help="How many nodes (ids n01, n02, ...)."),
    ids: str | None = typer.Option(None, help="Comma list of node ids instead of --nodes."),
    degree: int = typer.Option(4, min=1, help="Neighbours per node (partial-mesh)."),
    topology_file: Path | None = typer.Option(None, help="A fixed graph (TOML or GraphML)."),
    seed: int = typer.Option(0, help="The network's seed (as in p2pfl run --seed)."),
    round: int = typer.Option(1, min=0, help="Round to plan (random-walk changes per round)."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    out: Path | None = typer.Option(
        None, help="Write the overlay as a topology file (.toml or .graphml) to edit and reuse."
    ),
) -> None:
    """Show the overlay a schedule builds for a set of node ids: who sends to whom."""
    import json

    import networkx as nx
    from rich.console import Console
    from rich.table import Table

    from p2pfl.topology import load_graph, make_schedule, write_graph

    members = (
        [i.strip() for i in ids.split(",") if i.strip()]
        if ids
        else [f"n{i + 1:0{max(2, len(str(nodes)))}d}" for i in range(nodes)]
    )
    try:
        graph = None if topology_file is None else load_graph(topology_file)
        plan_of = make_schedule(schedule, degree=degree, seed=seed, graph=graph)
    except (ValueError, OSError) as exc:
        typer.echo(f"config error: {exc}", err=True)
        raise typer.Exit(code=2) from None
    plans = {m: plan_of.plan(m, members, round) for m in members}
    if out is not None:
        undirected = nx.Graph()
        undirected.add_nodes_from(members)
        undirected.add_edges_from((m, t) for m, p in plans.items() for t in p.send_to)
        write_graph(undirected, out)
    if json_out:
        rows = {m: {"send_to": list(p.send_to), "expect_from": list(p.expect_from)}
                for m, p in plans.items()}  # fmt: skip
        edges = [[m, t] for m, p in plans.items() for t in p.send_to]
        typer.echo(json.dumps({"schedule": schedule, "round": round, "nodes": rows,
                               "edges": edges}, indent=2))  # fmt: skip
        return
    table = Table(title=f"{schedule}, round {round}")
    table.add_column("node")
    table.add_column("sends to")
    table.add_column("waits for (sync)")
    for m, p in plans.items():
        table.add_row(m, ", ".join(p.send_to) or "-", ", ".join(p.expect_from) or "-")
    Console().print(table)
