"""Fixed overlays from files: networkx GraphML, or an edge-list TOML.

The TOML format is one array of two-id arrays, plus optional isolated nodes::

    # ring of four
    nodes = ["n05"]                       # optional: nodes with no edges
    edges = [["n01", "n02"], ["n02", "n03"], ["n03", "n04"], ["n04", "n01"]]

Ids are node ids as the nodes announce them (``--id``). Graphs are undirected (a directed
GraphML is read as undirected: a link carries models both ways); self-loops are refused.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import networkx as nx

GRAPHML_SUFFIXES = (".graphml", ".xml")
TOML_SUFFIXES = (".toml",)


def load_graph(path: str | Path) -> nx.Graph:
    """Read an undirected graph with string node ids from a ``.toml`` or ``.graphml`` file."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in TOML_SUFFIXES:
        graph = _load_toml(path)
    elif suffix in GRAPHML_SUFFIXES:
        try:
            loaded = nx.read_graphml(path)
        except Exception as exc:  # networkx raises bare ElementTree and NetworkX errors
            raise ValueError(f"{path}: not a readable GraphML file: {exc}") from exc
        graph = nx.Graph()
        graph.add_nodes_from(str(node) for node in loaded.nodes)
        graph.add_edges_from((str(a), str(b)) for a, b in loaded.edges())
    else:
        raise ValueError(
            f"{path}: unknown graph file type {suffix!r}; use .toml (edge list) or .graphml"
        )
    loops = sorted(str(a) for a, b in graph.edges() if a == b)
    if loops:
        raise ValueError(f"{path}: self-loop on node {loops[0]!r}")
    return graph


def write_graph(graph: nx.Graph, path: str | Path) -> None:
    """Write ``graph`` as edge-list TOML or GraphML, chosen by the file suffix."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in TOML_SUFFIXES:
        path.write_text(dump_toml(graph), encoding="utf-8")
    elif suffix in GRAPHML_SUFFIXES:
        nx.write_graphml(graph, path)
    else:
        raise ValueError(
            f"{path}: unknown graph file type {suffix!r}; use .toml (edge list) or .graphml"
        )


def dump_toml(graph: nx.Graph) -> str:
    """The edge-list TOML text for ``graph`` (edges sorted, one per line)."""
    edges = sorted(tuple(sorted((str(a), str(b)))) for a, b in graph.edges())
    linked = {node for edge in edges for node in edge}
    isolated = sorted(str(node) for node in graph.nodes if str(node) not in linked)
    # JSON string literals are valid TOML basic strings.
    lines = []
    if isolated:
        lines.append(f"nodes = [{', '.join(json.dumps(node) for node in isolated)}]")
    lines.append("edges = [")
    lines.extend(f"  [{json.dumps(a)}, {json.dumps(b)}]," for a, b in edges)
    lines.append("]")
    return "\n".join(lines) + "\n"


def _load_toml(path: Path) -> nx.Graph:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: not valid TOML: {exc}") from exc
    unknown = sorted(set(data) - {"nodes", "edges", "name", "description"})
    if unknown:
        raise ValueError(f"{path}: unknown key {unknown[0]!r}; expected 'edges' and 'nodes'")
    edges = data.get("edges")
    if not isinstance(edges, list):
        raise ValueError(f'{path}: needs edges = [["a", "b"], ...]')
    nodes = data.get("nodes", [])
    if not isinstance(nodes, list) or not all(isinstance(node, str) for node in nodes):
        raise ValueError(f'{path}: nodes must be a list of ids, e.g. nodes = ["n01"]')
    graph = nx.Graph()
    graph.add_nodes_from(nodes)
    for index, edge in enumerate(edges):
        if (
            not isinstance(edge, list)
            or len(edge) != 2
            or not all(isinstance(node, str) and node for node in edge)
        ):
            raise ValueError(f"{path}: edge {index} must be two node ids, got {edge!r}")
        graph.add_edge(edge[0], edge[1])
    return graph
