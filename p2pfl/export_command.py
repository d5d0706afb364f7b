"""`p2pfl export`: write a node's learned model (or the average of several) to a file.

``--run RUN`` picks the run of the state dir (default: the one started last; `p2pfl runs list`).
"""

from __future__ import annotations

from pathlib import Path

import typer

EPILOG = """
Examples:

  p2pfl export --state-dir st/n1 --out model.safetensors          # newest good checkpoint
  p2pfl export --state-dir st/n1 --round 20 --out r20.safetensors
  p2pfl export --state-dir st/n1 --run trial-2 --out t2.safetensors # a run other than the last
  p2pfl export --state-dir st/n1 --format pt --out model.pt        # torch state_dict
  p2pfl export --state-dir st/n1 --format onnx --out model.onnx    # pip install 'p2pfl[onnx]'
  p2pfl export --consensus st/n1 st/n2 st/n3 --out avg.safetensors # the nodes' average

Exit status: 0 written, 2 a state dir, checkpoint or output that cannot be used.
"""


def export(
    state_dir: Path | None = typer.Option(
        None, "--state-dir", help="The node's state dir (as given to p2pfl run)."
    ),
    run: str | None = typer.Option(
        None, "--run", help="This run's checkpoints. [default: the run started last]"
    ),
    round: int | None = typer.Option(
        None, "--round", min=0, help="This round's checkpoint. [default: the newest good one]"
    ),
    out: Path = typer.Option(..., "--out", help="The file to write."),
    format: str = typer.Option("safetensors", "--format", help="safetensors | pt | onnx."),
    consensus: list[Path] | None = typer.Option(
        None,
        "--consensus",
        help="DIR...: average the newest good checkpoints of these nodes' state dirs "
        "(one model spec) instead of exporting one node.",
    ),
    more_dirs: list[Path] | None = typer.Argument(
        None, metavar="DIR", hidden=True, help="The further state dirs of --consensus."
    ),
) -> None:
    """Write a node's model (safetensors, torch state_dict or ONNX) from its state dir."""
    from p2pfl.export import FORMATS, ExportError, export_consensus, export_node, write

    try:
        if format not in FORMATS:
            raise ExportError(f"--format must be one of {', '.join(FORMATS)}, got {format!r}")
        if consensus:
            if state_dir is not None:
                raise ExportError("give --state-dir or --consensus, not both")
            exported = export_consensus([*consensus, *(more_dirs or ())], round, run)
        else:
            if more_dirs:
                raise ExportError(f"unexpected argument {str(more_dirs[0])!r}")
            if state_dir is None:
                raise ExportError("give --state-dir DIR (or --consensus DIR...)")
            exported = export_node(state_dir, round, run)
        for skipped in exported.skipped:
            typer.echo(f"warning: skipped checkpoint {skipped}", err=True)
        write(exported, out, format)
    except ExportError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from None
    meta = exported.metadata
    who = f"consensus of {len(consensus)}" if consensus else f"node {meta['node'] or '?'}"
    params = sum(int(w.size) for w in exported.weights.values())
    typer.echo(
        f"wrote {out} ({format}): {who}, round {meta['round']}, model {meta['model'] or '?'}, "
        f"{params:,} parameters"
    )
