"""Which run a node takes part in, and its record in the node's state dir (`p2pfl.runs`).

- ``--run-name NAME``: that run (resumed when the state dir holds it already).
- Without it, a node whose state dir holds an unfinished run (stopped early, or killed) resumes
  it: a crash restart carries on where it was.
- Otherwise the run is open until the node first writes anything (the checkpoint and metrics
  line of its first round): it announces, and then keeps, the run `p2pfl.runs.preferred` picks
  among its own default name (``<network>-<UTC timestamp>``) and those its peers announce in
  their presence. Two nodes started at once thus settle on one run (the earlier-named one, a
  named run before default-named ones); a node that joins later adopts the run its peers are
  in. A node that has written anything keeps its run.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

from p2pfl.config import NodeConfig
from p2pfl.protocol.topics import is_run_id
from p2pfl.runs import (
    RunRecord,
    Status,
    config_hash,
    default_run_name,
    iso_now,
    learning_config,
    migrate_legacy,
    preferred,
    read_record,
    unfinished_run,
    write_record,
)
from p2pfl.store import StateDir


class RunIdentity:
    """A node's run: chosen at start or at its first write, announced, recorded."""

    def __init__(
        self,
        config: NodeConfig,
        state: StateDir | None,
        heard: Callable[[], Iterable[str]],
        *,
        node_id: str,
        default_name: Callable[[str], str] = default_run_name,
    ) -> None:
        self.config, self.state, self.node_id = config, state, node_id
        self.heard = heard  # the runs the node's peers announce
        self.fixed: str | None = config.run_name or None
        self.own = config.run_name or default_name(config.network)
        self.config_data = learning_config(config)
        self.config_hash = config_hash(self.config_data)

    @property
    def id(self) -> str:
        """The run: the one kept, or the one this node would take now."""
        if self.fixed is not None:
            return self.fixed
        return preferred([self.own, *(r for r in self.heard() if is_run_id(r))])

    def begin(self) -> None:
        """At start: the configured run, or the unfinished one of the state dir (an older
        version's flat layout moved into one first). Blocking: call it off the loop."""
        if self.state is None:
            return
        legacy = migrate_legacy(self.state.path)
        if self.fixed is None:
            self.fixed = unfinished_run(self.state.path) or legacy
        if self.fixed is not None:
            self._open(self.fixed)

    def settle(self) -> str:
        """Keep the run from now on (before the node's first write). Blocking."""
        if self.fixed is None:
            self.fixed = self.id
            if self.state is not None:
                self._open(self.fixed)
        return self.fixed

    def checkpoint_meta(self) -> dict[str, Any]:
        """What a checkpoint records besides its weights (the run settled first). Blocking."""
        spec = {"model": self.config.model, "dataset": self.config.dataset,
                "seed": self.config.seed}  # fmt: skip
        return {"spec": spec, "run": self.settle(), "config_hash": self.config_hash}

    def finish(self, status: Status) -> None:
        """Record how the node left the run: finished, failed, or running (stopped early)."""
        if self.state is None or self.state.run is None:
            return
        record = read_record(self.state.run_path)
        if record is None:
            return
        ended = None if status == "running" else iso_now()
        write_record(
            self.state.run_path, record.model_copy(update={"status": status, "ended": ended})
        )

    def _open(self, run: str) -> None:
        assert self.state is not None
        self.state.use_run(run)
        old = read_record(self.state.run_path)
        record = RunRecord(
            run=run, node=self.node_id, tags=tuple(self.config.tags), config=self.config_data,
            config_hash=self.config_hash, started=old.started if old else iso_now(),
            status="running", pid=os.getpid(),
        )  # fmt: skip
        write_record(self.state.run_path, record)
