"""The monitor node (`p2pfl monitor`): watches a network without training.

`Monitor` discovers the nodes and listens to their telemetry, `NetworkState` keeps what it
heard and computes the global metrics, `dashboard` draws it in a terminal, `prometheus` serves
it (and a node's own counters) to Prometheus, `cli.run_monitor` ties it together.
"""
