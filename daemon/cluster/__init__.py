"""A cluster of daemons on one NATS JetStream log (docs/cluster.md), one job per module.

    placement   which node a start goes to (pure)
    lease       a node's lease and the nodes seen lost, as state machines (sans-IO)

Above the gateway's registry in the one-way order (events <- actors <- gateway <-
daemon): what is here decides for the cluster and calls down, never up.
"""
