"""The NATS side of the event log: the asyncio bridge, the JetStream log, the test cluster."""
